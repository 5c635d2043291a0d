"""publisher.v1.PublisherService/PublishJob across the real Jobs and Publisher services."""

import grpc
from google.protobuf import field_mask_pb2
from jobs.v1 import jobs_pb2
from publisher.v1 import publisher_pb2

from tests.conftest import as_profile, connect_profile, new_profile_id
from tests.publisher_requests import expect_status

Code = grpc.StatusCode
CONTENT = "Our new product video"


async def completed_job(jobs_stub, metadata, **result: object) -> jobs_pb2.Job:
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")), metadata=metadata
    )
    change = jobs_pb2.Job(job_id=job.job_id, status=jobs_pb2.COMPLETED)
    change.result.update(result)
    return await jobs_stub.UpdateJob(
        jobs_pb2.UpdateJobRequest(
            job=change, update_mask=field_mask_pb2.FieldMask(paths=["status", "result"])
        ),
        metadata=metadata,
    )


def publish_request(job: jobs_pb2.Job, profile) -> publisher_pb2.PublishJobRequest:
    return publisher_pb2.PublishJobRequest(
        job_id=job.job_id,
        integration_ids=[i["id"] for i in profile.organization.integrations],
        content=CONTENT,
    )


async def test_publish_job_uploads_the_video_posts_it_and_writes_the_post_ids_back(
    jobs_stub, publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.files["render.mp4"] = b"\x00\x00\x00\x18ftypmp42" + bytes(1000)
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url=f"{fake_postiz.base_url}/files/render.mp4"
    )
    publication = await publisher_stub.PublishJob(
        publish_request(job, postiz_profile), metadata=postiz_profile.metadata
    )
    organization = postiz_profile.organization
    assert publication.state == publisher_pb2.PUBLICATION_STATE_ACCEPTED
    assert publication.job_id == job.job_id
    assert len(organization.media) == 1
    assert {p["id"] for p in organization.live_posts} == {p.post_id for p in publication.posts}
    assert all(p["image"][0]["id"] == organization.media[0]["id"] for p in organization.live_posts)
    updated = await jobs_stub.GetJob(
        jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=postiz_profile.metadata
    )
    written = updated.result["publication"]
    assert updated.result["video_url"] == job.result["video_url"]
    assert [p["post_id"] for p in written["posts"]] == [p.post_id for p in publication.posts]


async def test_publish_job_twice_posts_once(jobs_stub, publisher_stub, fake_postiz, postiz_profile):
    fake_postiz.files["twice.mp4"] = bytes(100)
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url=f"{fake_postiz.base_url}/files/twice.mp4"
    )
    request = publish_request(job, postiz_profile)
    first = await publisher_stub.PublishJob(request, metadata=postiz_profile.metadata)
    second = await publisher_stub.PublishJob(request, metadata=postiz_profile.metadata)
    assert second.posts == first.posts
    assert len(postiz_profile.organization.media) == 1
    assert len(postiz_profile.organization.live_posts) == len(first.posts)


async def test_publish_job_of_an_unfinished_job_is_a_failed_precondition(
    jobs_stub, publisher_stub, postiz_profile
):
    job = await jobs_stub.CreateJob(
        jobs_pb2.CreateJobRequest(job=jobs_pb2.Job(kind="video_render")),
        metadata=postiz_profile.metadata,
    )
    details = await expect_status(
        publisher_stub.PublishJob(
            publish_request(job, postiz_profile), metadata=postiz_profile.metadata
        ),
        Code.FAILED_PRECONDITION,
    )
    assert "PENDING" in details


async def test_publish_job_without_a_video_in_its_result_is_a_failed_precondition(
    jobs_stub, publisher_stub, postiz_profile
):
    job = await completed_job(jobs_stub, postiz_profile.metadata, frames=10)
    details = await expect_status(
        publisher_stub.PublishJob(
            publish_request(job, postiz_profile), metadata=postiz_profile.metadata
        ),
        Code.FAILED_PRECONDITION,
    )
    assert "video_url" in details


async def test_publish_job_of_another_profiles_job_is_not_found(
    jobs_stub, publisher_stub, fake_postiz
):
    owner = as_profile(new_profile_id())
    job = await completed_job(jobs_stub, owner, video_url=f"{fake_postiz.base_url}/files/x.mp4")
    other = await connect_profile(publisher_stub, fake_postiz)
    await expect_status(
        publisher_stub.PublishJob(publish_request(job, other), metadata=other.metadata),
        Code.NOT_FOUND,
    )
    assert other.organization.live_posts == []


async def test_publish_job_again_with_other_content_is_invalid(
    jobs_stub, publisher_stub, fake_postiz, postiz_profile
):
    fake_postiz.files["again.mp4"] = bytes(100)
    job = await completed_job(
        jobs_stub, postiz_profile.metadata, video_url=f"{fake_postiz.base_url}/files/again.mp4"
    )
    request = publish_request(job, postiz_profile)
    await publisher_stub.PublishJob(request, metadata=postiz_profile.metadata)
    request.content = "Something else entirely"
    await expect_status(
        publisher_stub.PublishJob(request, metadata=postiz_profile.metadata),
        Code.INVALID_ARGUMENT,
    )

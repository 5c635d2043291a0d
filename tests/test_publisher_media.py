"""publisher.v1.PublisherService: media streamed on to Postiz."""

import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator

import grpc
from publisher.v1 import publisher_pb2

from tests.publisher_requests import expect_status

Code = grpc.StatusCode
MIB = 1024 * 1024


async def upload_requests(
    content_type: str, size: int, chunks: AsyncIterator[bytes] | list[bytes], name="clip.mp4"
) -> AsyncIterator[publisher_pb2.UploadMediaRequest]:
    yield publisher_pb2.UploadMediaRequest(
        metadata=publisher_pb2.MediaMetadata(
            filename=name, content_type=content_type, size_bytes=size
        )
    )
    if isinstance(chunks, list):
        for chunk in chunks:
            yield publisher_pb2.UploadMediaRequest(chunk=chunk)
    else:
        async for chunk in chunks:
            yield publisher_pb2.UploadMediaRequest(chunk=chunk)


def uploads_sent(fake, profile) -> int:
    return sum(
        r.api_key == profile.organization.api_key for r in fake.requests_of("POST", "/upload")
    )


async def test_upload_media_streams_the_file_to_postiz(publisher_stub, postiz_profile):
    content = os.urandom(3 * MIB + 17)
    chunks = [content[i : i + MIB] for i in range(0, len(content), MIB)]
    media = await publisher_stub.UploadMedia(
        upload_requests("video/mp4", len(content), chunks), metadata=postiz_profile.metadata
    )
    assert media.id
    assert media.name == "clip.mp4"
    assert media.path.endswith("/clip.mp4")
    assert postiz_profile.organization.uploads[media.id] == (
        hashlib.sha256(content).hexdigest(),
        len(content),
    )


async def test_large_upload_is_streamed_with_bounded_memory(publisher_stub, postiz_profile):
    size, chunk_size = 48 * MIB, 512 * 1024
    digest = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(size // chunk_size):
            chunk = os.urandom(chunk_size)
            digest.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        media = await publisher_stub.UploadMedia(
            upload_requests("video/mp4", size, chunks()), metadata=postiz_profile.metadata
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert postiz_profile.organization.uploads[media.id] == (digest.hexdigest(), size)
    assert peak < 12 * MIB, f"peak {peak / MIB:.1f} MiB for a {size // MIB} MiB upload"


async def test_unsupported_type_is_refused_before_anything_is_sent(
    publisher_stub, fake_postiz, postiz_profile
):
    details = await expect_status(
        publisher_stub.UploadMedia(
            upload_requests("application/pdf", 10, [b"x" * 10], name="a.pdf"),
            metadata=postiz_profile.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "video/mp4" in details
    assert uploads_sent(fake_postiz, postiz_profile) == 0


async def test_image_over_10_mb_is_refused_before_anything_is_sent(
    publisher_stub, fake_postiz, postiz_profile
):
    await expect_status(
        publisher_stub.UploadMedia(
            upload_requests("image/png", 11 * MIB, [b"x"], name="a.png"),
            metadata=postiz_profile.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert uploads_sent(fake_postiz, postiz_profile) == 0


async def test_upload_shorter_than_its_declared_size_is_invalid(publisher_stub, postiz_profile):
    details = await expect_status(
        publisher_stub.UploadMedia(
            upload_requests("video/mp4", 1000, [b"x" * 10]), metadata=postiz_profile.metadata
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "10 of size_bytes=1000" in details
    assert postiz_profile.organization.media == []


async def test_upload_without_metadata_first_is_invalid(publisher_stub, postiz_profile):
    async def chunk_only() -> AsyncIterator[publisher_pb2.UploadMediaRequest]:
        yield publisher_pb2.UploadMediaRequest(chunk=b"data")

    await expect_status(
        publisher_stub.UploadMedia(chunk_only(), metadata=postiz_profile.metadata),
        Code.INVALID_ARGUMENT,
    )


async def test_upload_media_from_url_lets_postiz_fetch_it(
    publisher_stub, fake_postiz, postiz_profile
):
    content = os.urandom(1000)
    fake_postiz.files["from-url.mp4"] = content
    media = await publisher_stub.UploadMediaFromUrl(
        publisher_pb2.UploadMediaFromUrlRequest(url=f"{fake_postiz.base_url}/files/from-url.mp4"),
        metadata=postiz_profile.metadata,
    )
    assert postiz_profile.organization.uploads[media.id] == (
        hashlib.sha256(content).hexdigest(),
        len(content),
    )


async def test_upload_media_from_a_url_postiz_cannot_fetch_is_invalid(
    publisher_stub, fake_postiz, postiz_profile
):
    details = await expect_status(
        publisher_stub.UploadMediaFromUrl(
            publisher_pb2.UploadMediaFromUrlRequest(url=f"{fake_postiz.base_url}/files/missing"),
            metadata=postiz_profile.metadata,
        ),
        Code.INVALID_ARGUMENT,
    )
    assert "Failed to fetch URL" in details

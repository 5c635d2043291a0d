"""publisher.v1.PublisherService: validates requests and converts between messages and the
model."""

from collections.abc import AsyncIterator, Mapping

from google.protobuf import empty_pb2, json_format, struct_pb2
from grpc.aio import ServicerContext
from publisher.v1 import publisher_pb2, publisher_pb2_grpc

from services.publisher import model
from services.publisher.publishing import Publisher
from services.runtime.call_context import require_profile_id
from services.runtime.errors import InvalidArgument
from services.runtime.fields import (
    at_most,
    optional_datetime,
    struct_dict,
    struct_message,
    text,
    timestamp_message,
)
from services.runtime.lifecycle import EXPORT_PAGE_ROWS, log_deleted
from services.runtime.page_tokens import decode_page_token, page_size
from services.runtime.paging import encoded_page

MAX_REQUEST_ID_LENGTH = 128
MAX_ID_LENGTH = 256
MAX_URL_LENGTH = 2048
MAX_CONTENT_LENGTH = 100_000
MAX_FILENAME_LENGTH = 255
# A post goes to at most this many of the profile's channels (integrations) at once.
MAX_INTEGRATIONS = 20
# A post on one channel: a thread of at most MAX_VALUES values, each with at most MAX_MEDIA
# files (Instagram's carousel and X's thread are far shorter).
MAX_VALUES = 10
MAX_MEDIA = 10
# Files in all the values of all the posts of one CreatePost: the counts above multiply.
MAX_MEDIA_IN_ALL = 50
MAX_TAGS = 20
# A channel's settings are a handful of fields (a title, a board, a few tags or
# subreddits): 100 values and 32 KB are a few times the largest Postiz provider's.
MAX_SETTINGS_VALUES = 100
MAX_SETTINGS_BYTES = 32_768

_POST_TYPES = {
    publisher_pb2.POST_TYPE_NOW: model.PostType.NOW,
    publisher_pb2.POST_TYPE_SCHEDULE: model.PostType.SCHEDULE,
    publisher_pb2.POST_TYPE_DRAFT: model.PostType.DRAFT,
}


def _text(value: str, field: str, limit: int, required: bool = True) -> str:
    return text(value, field, limit=limit, required=required)


def _content(value: str, field: str) -> str:
    return text(value, field, limit=MAX_CONTENT_LENGTH, required=True, free_text=True)


def _url(value: str, field: str) -> str:
    _text(value, field, MAX_URL_LENGTH)
    if not value.startswith(("https://", "http://")):
        raise InvalidArgument(f"{field} must be an http(s) URL")
    return value


def credentials_message(stored: model.StoredCredentials) -> publisher_pb2.PostizCredentials:
    return publisher_pb2.PostizCredentials(
        base_url=stored.base_url,
        api_key_fingerprint=stored.api_key_fingerprint,
        verify_time=timestamp_message(stored.verify_time),
        update_time=timestamp_message(stored.update_time),
    )


def media_message(media: model.Media) -> publisher_pb2.Media:
    return publisher_pb2.Media(id=media.id, name=media.name, path=media.path)


def publication_message(publication: model.Publication) -> publisher_pb2.Publication:
    return publisher_pb2.Publication(
        request_id=publication.request_id,
        job_id=publication.job_id,
        state=publisher_pb2.PublicationState.Value(f"PUBLICATION_STATE_{publication.state}"),
        posts=[
            publisher_pb2.CreatedPost(post_id=p.post_id, integration_id=p.integration_id)
            for p in publication.posts
        ],
        error=publication.error,
        attempt_count=publication.attempt_count,
        publish_time=timestamp_message(publication.publish_time),
        create_time=timestamp_message(publication.create_time),
        update_time=timestamp_message(publication.update_time),
    )


_POST_STATES = dict(publisher_pb2.PostState.items())


def post_message(post: model.PostizPost) -> publisher_pb2.Post:
    return publisher_pb2.Post(
        id=post.id,
        content=post.content,
        publish_time=timestamp_message(post.publish_time),
        release_url=post.release_url,
        state=_POST_STATES.get(f"POST_STATE_{post.state}", publisher_pb2.POST_STATE_UNSPECIFIED),
        group=post.group,
        integration_id=post.integration_id,
        integration_name=post.integration_name,
        integration_identifier=post.integration_identifier,
    )


def integration_message(integration: model.Integration) -> publisher_pb2.Integration:
    return publisher_pb2.Integration(
        id=integration.id,
        name=integration.name,
        identifier=integration.identifier,
        picture=integration.picture,
        disabled=integration.disabled,
        profile=integration.profile,
        customer_id=integration.customer_id,
        customer_name=integration.customer_name,
    )


def _settings(message: struct_pb2.Struct, field: str) -> dict:
    return struct_dict(message, field, max_values=MAX_SETTINGS_VALUES, max_bytes=MAX_SETTINGS_BYTES)


def _postiz_posts(request: publisher_pb2.CreatePostRequest) -> list[dict]:
    at_most(request.posts, "posts", MAX_INTEGRATIONS)
    media = sum(len(value.media) for post in request.posts for value in post.values)
    if media > MAX_MEDIA_IN_ALL:
        raise InvalidArgument(
            f"posts hold more than {MAX_MEDIA_IN_ALL} media in all ({media}); "
            f"each value may hold {MAX_MEDIA}"
        )
    posts = []
    for index, post in enumerate(request.posts):
        field = f"posts[{index}]"
        if not post.values:
            raise InvalidArgument(f"{field}.values must hold at least one value")
        values = [
            {
                "content": _content(value.content, f"{field}.values[{i}].content"),
                "image": [
                    {
                        "id": _text(m.id, f"{field}.values[{i}].media.id", MAX_ID_LENGTH),
                        "path": _text(m.path, f"{field}.values[{i}].media.path", MAX_URL_LENGTH),
                    }
                    for m in at_most(value.media, f"{field}.values[{i}].media", MAX_MEDIA)
                ],
            }
            for i, value in enumerate(at_most(post.values, f"{field}.values", MAX_VALUES))
        ]
        posts.append(
            {
                "integration": {
                    "id": _text(post.integration_id, f"{field}.integration_id", MAX_ID_LENGTH)
                },
                "value": values,
                "settings": _settings(post.settings, f"{field}.settings"),
            }
        )
    return posts


def _tags(request: publisher_pb2.CreatePostRequest) -> list[dict[str, str]]:
    tags = []
    for index, tag in enumerate(at_most(request.tags, "tags", MAX_TAGS)):
        value = _text(tag.value, f"tags[{index}].value", MAX_ID_LENGTH)
        label = _text(tag.label, f"tags[{index}].label", MAX_ID_LENGTH, required=False)
        tags.append({"value": value, "label": label or value})
    return tags


def _draft(request: publisher_pb2.CreatePostRequest) -> model.PublicationDraft:
    request_id = _text(request.request_id, "request_id", MAX_REQUEST_ID_LENGTH)
    post_type = _POST_TYPES.get(request.type)
    if post_type is None:
        raise InvalidArgument("type must be POST_TYPE_NOW, POST_TYPE_SCHEDULE or POST_TYPE_DRAFT")
    job_id = _text(request.job_id, "job_id", MAX_ID_LENGTH, required=False)
    publish_time = optional_datetime(request, "publish_time")
    posts = _postiz_posts(request)
    tags = _tags(request)
    # Copied and described (the costliest step) only once every field has passed.
    described = publisher_pb2.CreatePostRequest()
    described.CopyFrom(request)
    described.ClearField("request_id")
    return model.new_draft(
        request_id=request_id,
        job_id=job_id,
        post_type=post_type,
        publish_time=publish_time,
        posts=posts,
        tags=tags,
        short_link=request.short_link,
        described_as=json_format.MessageToDict(described),
    )


async def _chunks(
    requests: AsyncIterator[publisher_pb2.UploadMediaRequest],
) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgument("only the first UploadMediaRequest may carry metadata")
        if len(request.chunk) > model.MAX_CHUNK_BYTES:
            raise InvalidArgument(f"a chunk must be at most {model.MAX_CHUNK_BYTES} bytes")
        yield request.chunk


def _job_settings(settings: Mapping[str, struct_pb2.Struct]) -> dict[str, dict]:
    """PublishJob's settings by integration id, each checked like CreatePost's."""
    converted = {}
    for key in at_most(settings, "settings", MAX_INTEGRATIONS):
        field = f"settings[{key[:64]!r}]"
        converted[_text(key, f"{field} key", MAX_ID_LENGTH)] = _settings(settings[key], field)
    return converted


class PublisherServicer(publisher_pb2_grpc.PublisherServiceServicer):
    def __init__(self, publisher: Publisher, reply_bytes: int) -> None:
        """`reply_bytes`: the most a list reply's rows may take (paging.reply_budget)."""
        self._publisher = publisher
        self._reply_bytes = reply_bytes

    async def SetPostizCredentials(
        self, request: publisher_pb2.SetPostizCredentialsRequest, context: ServicerContext
    ) -> publisher_pb2.PostizCredentials:
        base_url = _text(request.base_url, "base_url", MAX_URL_LENGTH)
        if not (request.api_key.isascii() and request.api_key.isprintable()):
            # It travels in an HTTP header: anything else cannot be a Postiz key.
            raise InvalidArgument("api_key must be printable ASCII, as Postiz shows it")
        api_key = _text(request.api_key, "api_key", 1024)
        return credentials_message(
            await self._publisher.set_credentials(require_profile_id(), base_url, api_key)
        )

    async def GetPostizCredentials(
        self, request: publisher_pb2.GetPostizCredentialsRequest, context: ServicerContext
    ) -> publisher_pb2.PostizCredentials:
        return credentials_message(await self._publisher.get_credentials(require_profile_id()))

    async def DeletePostizCredentials(
        self, request: publisher_pb2.DeletePostizCredentialsRequest, context: ServicerContext
    ) -> empty_pb2.Empty:
        await self._publisher.delete_credentials(require_profile_id())
        return empty_pb2.Empty()

    async def ListIntegrations(
        self, request: publisher_pb2.ListIntegrationsRequest, context: ServicerContext
    ) -> publisher_pb2.ListIntegrationsResponse:
        integrations = await self._publisher.list_integrations(require_profile_id())
        return publisher_pb2.ListIntegrationsResponse(
            integrations=[integration_message(i) for i in integrations]
        )

    async def UploadMedia(
        self,
        request_iterator: AsyncIterator[publisher_pb2.UploadMediaRequest],
        context: ServicerContext,
    ) -> publisher_pb2.Media:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidArgument("the first UploadMediaRequest must carry metadata")
        upload = model.MediaUpload(
            filename=_text(
                first.metadata.filename, "metadata.filename", MAX_FILENAME_LENGTH, required=False
            ),
            content_type=first.metadata.content_type,
            size_bytes=first.metadata.size_bytes,
        )
        media = await self._publisher.upload(
            require_profile_id(), upload, _chunks(request_iterator)
        )
        return media_message(media)

    async def UploadMediaFromUrl(
        self, request: publisher_pb2.UploadMediaFromUrlRequest, context: ServicerContext
    ) -> publisher_pb2.Media:
        media = await self._publisher.upload_from_url(
            require_profile_id(), _url(request.url, "url")
        )
        return media_message(media)

    async def CreatePost(
        self, request: publisher_pb2.CreatePostRequest, context: ServicerContext
    ) -> publisher_pb2.Publication:
        return publication_message(
            await self._publisher.create_post(require_profile_id(), _draft(request))
        )

    async def ListPosts(
        self, request: publisher_pb2.ListPostsRequest, context: ServicerContext
    ) -> bytes:  # a ListPostsResponse, encoded (paging.encoded_page)
        start = optional_datetime(request, "start_time")
        end = optional_datetime(request, "end_time")
        if start is None or end is None:
            raise InvalidArgument("start_time and end_time are required")
        size = page_size(request.page_size)
        window = [start.isoformat(), end.isoformat()]
        after = None
        if request.page_token:
            after = decode_page_token(request.page_token, window, parse_id=str)
        posts, more = await self._publisher.page_of_posts(
            require_profile_id(), start, end, after, size
        )
        response = publisher_pb2.ListPostsResponse()
        return await encoded_page(
            response,
            "posts",
            posts,
            more=more,
            to_message=post_message,
            position=lambda post: (post.publish_time, post.id),
            filters=window,
            max_bytes=self._reply_bytes,
        )

    async def GetPost(
        self, request: publisher_pb2.GetPostRequest, context: ServicerContext
    ) -> publisher_pb2.Post:
        post = await self._publisher.get_post(
            require_profile_id(),
            _text(request.post_id, "post_id", MAX_ID_LENGTH),
            optional_datetime(request, "start_time"),
            optional_datetime(request, "end_time"),
        )
        return post_message(post)

    async def DeletePost(
        self, request: publisher_pb2.DeletePostRequest, context: ServicerContext
    ) -> empty_pb2.Empty:
        await self._publisher.delete_post(
            require_profile_id(), _text(request.post_id, "post_id", MAX_ID_LENGTH)
        )
        return empty_pb2.Empty()

    async def PublishJob(
        self, request: publisher_pb2.PublishJobRequest, context: ServicerContext
    ) -> publisher_pb2.Publication:
        publication = await self._publisher.publish_job(
            require_profile_id(),
            job_id=_text(request.job_id, "job_id", MAX_ID_LENGTH),
            integration_ids=[
                _text(i, "integration_ids", MAX_ID_LENGTH)
                for i in at_most(request.integration_ids, "integration_ids", MAX_INTEGRATIONS)
            ],
            content=_content(request.content, "content"),
            publish_time=optional_datetime(request, "publish_time"),
            settings=_job_settings(request.settings),
        )
        return publication_message(publication)

    async def ExportProfile(
        self, request: publisher_pb2.ExportProfileRequest, context: ServicerContext
    ) -> AsyncIterator[publisher_pb2.ExportProfileResponse]:
        pages = self._publisher.export_pages(require_profile_id(), EXPORT_PAGE_ROWS)
        async for credentials, publications in pages:
            yield publisher_pb2.ExportProfileResponse(
                credentials=None if credentials is None else credentials_message(credentials),
                publications=[
                    publisher_pb2.ExportedPublication(
                        publication=publication_message(publication),
                        postiz_request=struct_message(publication.postiz_request),
                    )
                    for publication in publications
                ],
            )

    async def DeleteProfile(
        self, request: publisher_pb2.DeleteProfileRequest, context: ServicerContext
    ) -> publisher_pb2.DeleteProfileResponse:
        profile_id = require_profile_id()
        if request.validate_only:
            credentials, publications = await self._publisher.count_for_deletion(profile_id)
            return publisher_pb2.DeleteProfileResponse(
                credentials=credentials, publications=publications, done=True
            )
        credentials, publications, done = await self._publisher.delete_profile(profile_id)
        log_deleted(f"Postiz credentials ({credentials}) and {publications} publications", done)
        return publisher_pb2.DeleteProfileResponse(
            credentials=credentials, publications=publications, done=done
        )

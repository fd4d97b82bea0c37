"""Images in `tinylm serve` chat requests: OpenAI `image_url` content parts with base64 `data:` URLs.

    {"role": "user", "content": [{"type": "text", "text": "What colour is the shape?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}]}

The images of a message become `<image>\\n` placeholders in front of its text, in order - LLaVA's
convention, which the training data (tinylm/data/vision_data.py: `place_images`) and `tinylm chat
--image` follow too, and what vLLM does for LLaVA models - so a served prompt is token for token the
prompt of training and of the terminal chat. Several images per message and per conversation work;
the engine (tinylm/inference/vlm_engine.py) batches image and text requests together.

Refused with a 400 that names the field:
- remote `http(s)://` URLs: never fetched (a server that fetches URLs named by its clients can be made
  to reach hosts only it can reach - SSRF - and `tinylm serve` works offline);
- any other scheme, a data URL that is not base64 or not `image/*`, base64 that does not decode,
  bytes that are not a readable image (decoded here, before the request is queued);
- image parts sent to a text-only model, or in a non-user message;
- in a request with images: text that contains `<image>` or `<|image_pad|>` (only image parts make
  image tokens, so text can never forge or miscount them), and tools / thinking switches (the tool
  prompt path has no image placeholders yet).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from PIL import Image

from tinylm.data.vision_data import decode_image
from tinylm.models.vision import IMAGE_PAD, PLACEHOLDER
from tinylm.serving.api_error import APIError

MAX_BODY_BYTES = 32 << 20  # request body limit when serving a VLM (base64 images are large; text: 1 MiB)
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)


def decode_data_url(url: object, param: str) -> Image.Image:
    """A base64 `data:image/...` URL -> RGB PIL image, or an APIError(400) naming `param`."""
    if not isinstance(url, str):
        raise APIError(400, f"'{param}' must be a string", param=param)
    head = url[:64].lower()
    if head.startswith(("http://", "https://")):
        raise APIError(400, f"'{param}': remote image URLs are not fetched; send the image inline as a base64 "
                            "data URL (data:image/png;base64,...)", param=param, code="image_url_not_supported")
    m = _DATA_URL.match(url)
    if m is None:
        raise APIError(400, f"'{param}' must be a base64 data URL (data:image/png;base64,...), got "
                            f"{url[:40]!r}{'...' if len(url) > 40 else ''}", param=param)
    if m.group(1) and not m.group(1).lower().startswith("image/"):
        raise APIError(400, f"'{param}': media type {m.group(1)!r} is not an image", param=param)
    try:
        data = base64.b64decode(url[m.end():].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}': the data URL is not valid base64", param=param) from None
    try:
        return decode_image(data, f"'{param}'")
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None
    except Image.DecompressionBombError as e:  # PIL's guard against images that decode to gigapixels
        raise APIError(400, f"'{param}': {e}", param=param) from None


def parse_parts(parts: list, i: int) -> tuple[str, list[Image.Image]]:
    """A message's content parts -> (text with `<image>\\n` per image in front, images in order)."""
    texts, images = [], []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            texts.append(p["text"])
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url  # some clients send the URL string itself
            images.append(decode_data_url(url, f"messages[{i}].content[{j}].image_url.url"))
        else:
            raise APIError(400, f"messages[{i}].content[{j}]: only text parts {{\"type\": \"text\", \"text\": string}} "
                                "and image parts {\"type\": \"image_url\", \"image_url\": {\"url\": data URL}} are "
                                "supported", param=f"messages[{i}].content")
    return (PLACEHOLDER + "\n") * len(images) + "".join(texts), images


def request_images(messages: list[dict], engine: Any) -> list[Image.Image]:
    """All images of a parsed conversation in order; 400 when there are some and the model takes none."""
    images = [im for m in messages for im in m.get("images", ())]
    for i, m in enumerate(messages):
        if m.get("images") and m["role"] != "user":
            raise APIError(400, f"messages[{i}]: image parts are accepted in user messages only",
                           param=f"messages[{i}].content")
    if images and not hasattr(engine.gen, "vlm"):
        raise APIError(400, "this model takes no images (it is not a vision-language model); send text parts only",
                       param="messages", code="images_not_supported")
    return images


def render(tokenizer: Any, engine: Any, messages: list[dict], body: dict) -> list[int]:
    """Prompt ids of a conversation with images: `<image>` placeholders -> image-pad blocks, as in training."""
    from tinylm.data.vision_data import encode_vlm_chat

    for key in ("tools", "tool_choice", "chat_template_kwargs"):
        if body.get(key) is not None:
            raise APIError(400, f"'{key}' is not supported together with image parts yet", param=key)
    for i, m in enumerate(messages):
        marks = 0 if m["role"] == "assistant" else m["content"].count(PLACEHOLDER)  # assistant text is not expanded
        if IMAGE_PAD in m["content"] or marks != len(m.get("images", ())) or m.get("tool_calls") \
                or m["role"] == "tool":
            raise APIError(400, f"messages[{i}]: in a request with images, text may not contain {PLACEHOLDER} or "
                                f"{IMAGE_PAD} (images go in image_url parts), nor tool calls",
                           param=f"messages[{i}].content")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return encode_vlm_chat(tokenizer, plain, engine.gen.vlm.settings.tokens_per_image, add_generation_prompt=True)[0]

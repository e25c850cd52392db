"""The official OpenAI Python client against a cxmpute gateway, one call per service.

Run by crates/e2e/tests/openai_sdk.rs with CXMPUTE_BASE_URL, CXMPUTE_API_KEY and
CXMPUTE_PAGE_URL (a page served on loopback for the scraper). Exits non-zero with a
message on the first thing that is not as an OpenAI user would expect; prints one
JSON line with what it saw on success.
"""

import json
import math
import os
import sys

import openai
from openai import OpenAI

CHAT = "gemma-3-270m"
EMBED = "all-minilm-l6-v2"
SPEECH = "piper-en-us-joe-medium"

base_url = os.environ["CXMPUTE_BASE_URL"]
client = OpenAI(base_url=base_url, api_key=os.environ["CXMPUTE_API_KEY"], max_retries=0, timeout=120)
seen = {}


def check(cond, message):
    if not cond:
        sys.exit(f"openai client check failed: {message}")


# Models.
ids = {m.id for m in client.models.list()}
for want in (CHAT, EMBED, SPEECH, "web-scrape"):
    check(want in ids, f"{want} not in models.list(): {sorted(ids)}")
seen["models"] = sorted(ids)

# Chat, whole answer.
chat = client.chat.completions.create(
    model=CHAT,
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=8,
    temperature=0,
    seed=7,
)
check(chat.choices[0].message.role == "assistant", f"role {chat.choices[0].message.role}")
check(chat.choices[0].message.content, "empty chat answer")
check(1 <= chat.usage.completion_tokens <= 8, f"completion tokens {chat.usage.completion_tokens}")
seen["chat"] = chat.choices[0].message.content

# Chat, streamed with usage in a final chunk whose choices are empty.
stream = client.chat.completions.create(
    model=CHAT,
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=8,
    temperature=0,
    seed=7,
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
check(len(chunks) >= 2, f"{len(chunks)} chunks")
last = chunks[-1]
check(last.choices == [] and last.usage is not None, f"last chunk {last}")
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == chat.choices[0].message.content, f"stream {text!r} != whole {seen['chat']!r}")
check(last.usage.completion_tokens == chat.usage.completion_tokens, "usage differs between stream and whole")

# Embeddings: the client's default asks for base64 and decodes it; also floats.
sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
for fmt in (None, "float"):
    kwargs = {} if fmt is None else {"encoding_format": fmt}
    emb = client.embeddings.create(model=EMBED, input=sentences, **kwargs)
    vecs = [d.embedding for d in emb.data]
    check(len(vecs) == 3 and all(len(v) == 384 for v in vecs), "three 384-wide vectors")
    cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    sims = (round(cos(vecs[0], vecs[1]), 3), round(cos(vecs[0], vecs[2]), 3))
    check(sims == (0.666, 0.105), f"similarities {sims} ({fmt or 'default'})")
    check(emb.usage.prompt_tokens > 0, "embedding usage")
seen["embeddings"] = sims

# Speech, whole file and streamed.
wav = client.audio.speech.create(model=SPEECH, voice="alloy", input="Hello from cxmpute.", response_format="wav")
data = wav.read()
check(data[:4] == b"RIFF" and len(data) > 22050, f"{len(data)} bytes of wav")
with client.audio.speech.with_streaming_response.create(model=SPEECH, voice="joe", input="Streaming speech.") as res:
    check(res.headers.get("content-type") == "audio/mpeg", f"content-type {res.headers.get('content-type')}")
    mp3 = b"".join(res.iter_bytes())
check(len(mp3) > 2000, f"{len(mp3)} bytes of mp3")
seen["speech"] = {"wav": len(data), "mp3": len(mp3)}

# Scrape: not an OpenAI route, so through the client's generic post.
page = client.post("/scrape", body={"urls": [os.environ["CXMPUTE_PAGE_URL"]]}, cast_to=object)
md = page["results"][0].get("markdown") or ""
check("Tides of the North" in md, f"scraped markdown: {md[:200]!r}")
seen["scrape"] = len(md)

# Errors arrive as the client's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check(False, "unknown model accepted")
except openai.NotFoundError as e:
    check(e.code == "model_not_found", f"code {e.code}")
try:
    OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).embeddings.create(model=EMBED, input="x")
    check(False, "bad key accepted")
except openai.AuthenticationError:
    pass
try:
    client.embeddings.create(model=EMBED, input=[])
    check(False, "empty input accepted")
except openai.BadRequestError as e:
    check(e.param == "input", f"param {e.param}")

print(json.dumps(seen))

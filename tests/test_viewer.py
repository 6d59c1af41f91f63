"""The λ viewer (``ponder.server.viewer``, ``ponder inspect``, ``GET /ui``).

The data is checked against an independent forward of the model (λ, updated,
per-chunk cross-entropy with the schedule and with SKIP), the page in headless
Chromium (the file's text comes back exactly; a screenshot lands in
``test-artifacts/``), and the server's page against a real ``ponder serve``.
"""

import html.parser
import subprocess
import sys
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_tool

from ponder.checkpoints import DEFAULT_CHECKPOINT
from ponder.model import checkpoint
from ponder.model.gating import Schedule
from ponder.server.viewer.data import (
    Inspection,
    chunk_texts,
    inspect_tokens,
    padded_length,
)
from ponder.server.viewer.page import render_html

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# A little over two chunks of the bundled tokenizer, with what HTML must escape,
# non-ASCII text, a leading newline (which a <pre> would swallow) and CRLF endings.
SOURCE = "\n" + "\n".join(
    [
        "def clamp(value, low, high):",
        '    """Keep <value> & friends in [low, high] — «naïve» ✓ 😀."""',
        "    if value < low:",
        "        return low",
        "    return high if value > high else value",
        "",
        "class Box:",
        "    def __init__(self, items=None):",
        "        self.items = list(items or [])",
        "\r",
        "    def add(self, item):",
        "        self.items.append(item)  # <b>not bold</b> &amp;",
        "        return len(self.items)",
        "",
        "    def total(self):",
        "        return sum(x for x in self.items if x is not None)",
        "",
        "for i in range(10):",
        "    print(clamp(i * 3, 2, 17), '<', \"&\")",
    ]
)


@pytest.fixture(scope="module")
def loaded():
    return checkpoint.load(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def inspections(loaded) -> dict[str, Inspection]:
    model, tokenizer = loaded
    tokens = tokenizer.encode_document(SOURCE)
    return {kind: inspect_tokens(model, tokenizer, tokens, Schedule(kind), "sample.py") for kind in ("learned", "random")}


def _reference(model, tokens: list[int], schedule: Schedule):
    """λ, updated and per-token loss by one direct forward, padded to whole chunks with other tokens than the viewer's."""
    C = model.config.gate.chunk
    T = len(tokens)
    padded = np.concatenate([tokens, np.arange(-T % C) % 97 + 11]).astype(np.int32)[None]  # [1, whole chunks]
    out = model(jnp.asarray(padded), jnp.arange(padded.shape[1])[None], schedule)
    logp = jax.nn.log_softmax(out.logits[0], axis=-1)  # [T_padded, V]
    nll = -np.asarray(logp)[np.arange(T - 1), np.asarray(tokens[1:])]  # loss of tokens 1..T-1
    return np.asarray(out.chunk_lambda[0]), np.asarray(out.chunk_updated[0]), nll


@pytest.mark.parametrize("kind", ["learned", "random"])
def test_chunks_agree_with_an_independent_forward(loaded, inspections, kind):
    model, tokenizer = loaded
    inspection = inspections[kind]
    tokens = tokenizer.encode_document(SOURCE)
    C = model.config.gate.chunk
    assert len(tokens) > 2 * C and len(tokens) % C  # several chunks, the last one partial
    assert padded_length(len(tokens), C, model.config.base.n_positions) != -(-len(tokens) // C) * C

    lam, updated, nll = _reference(model, tokens, Schedule(kind))
    _, _, nll_skip = _reference(model, tokens, Schedule("skip"))
    assert len(inspection.chunks) == len(lam)
    np.testing.assert_allclose([c.lam for c in inspection.chunks], lam, rtol=1e-5, atol=1e-6)
    assert [c.updated for c in inspection.chunks] == updated.tolist()
    for c in inspection.chunks:
        scored = np.arange(max(c.token_start, 1), c.token_end) - 1  # nll index of each scored token
        assert c.scored == len(scored)
        np.testing.assert_allclose(c.ce, nll[scored].mean(), rtol=1e-5)
        np.testing.assert_allclose(c.ce_skip, nll_skip[scored].mean(), rtol=1e-5)
    np.testing.assert_allclose(inspection.ce, nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(inspection.ce_skip, nll_skip.mean(), rtol=1e-5)
    if kind == "random":
        assert 0 < inspection.chunks_updated < len(inspection.chunks), "the sample should mix updated and skipped chunks"


def test_spans_cover_the_text_once_and_totals_add_up(loaded, inspections):
    model, tokenizer = loaded
    tokens = tokenizer.encode_document(SOURCE)
    C = model.config.gate.chunk
    for inspection in inspections.values():
        assert inspection.text == SOURCE
        chunks = inspection.chunks
        assert chunks[0].char_start == 0 and chunks[-1].char_end == len(SOURCE)
        assert all(a.char_end == b.char_start for a, b in zip(chunks, chunks[1:]))
        assert all(a.token_end == b.token_start for a, b in zip(chunks, chunks[1:]))
        assert chunks[0].token_start == 0 and chunks[-1].token_end == len(tokens) == inspection.tokens
        for c in chunks:
            piece = tokenizer.decode([t for t in tokens[c.token_start : c.token_end] if t != tokenizer.eot_id])
            assert SOURCE[c.char_start : c.char_end] == piece  # no character of the sample straddles a boundary
            assert c.line == SOURCE.count("\n", 0, c.char_start) + 1
        chunk_flops = sum(layer.update_flops(C) for layer in model.ttt)
        assert inspection.scored_tokens == sum(c.scored for c in chunks) == len(tokens) - 1
        assert inspection.chunks_updated + inspection.chunks_skipped == len(chunks)
        assert inspection.chunks_updated == sum(c.lam > 0 for c in chunks)
        assert inspection.ttt_flops == sum(c.flops for c in chunks) == inspection.chunks_updated * chunk_flops
        assert inspection.update_1_flops == len(chunks) * chunk_flops
        assert inspection.mean_lambda == pytest.approx(np.mean([c.lam for c in chunks]))
        weighted = sum(c.ce * c.scored for c in chunks) / inspection.scored_tokens
        assert inspection.ce == pytest.approx(weighted, rel=1e-6)


def test_chunk_texts_give_a_split_character_to_the_chunk_that_completes_it(loaded):
    _, tokenizer = loaded
    text = "é€😀 ✓ naïve"
    tokens = tokenizer.encode_document(text)
    assert "\ufffd" in tokenizer.decode(tokens[1:2]), "the first token should hold part of a character"
    for chunk in (1, 2, 3):
        assert "".join(chunk_texts(tokenizer, tokens, chunk)) == text


def test_padded_lengths_are_few_buckets():
    assert [padded_length(n, 64, 1024) for n in (1, 64, 65, 129, 200, 1024, 1025, 3000)] == [
        64, 64, 128, 256, 256, 1024, 2048, 3072
    ]


def test_empty_document_and_base_checkpoint_errors(loaded):
    model, tokenizer = loaded
    empty = inspect_tokens(model, tokenizer, [], Schedule(), "nothing")
    assert empty.chunks == () and empty.ce is None and empty.tokens == 0
    assert 'id="empty"' in render_html(empty)
    with pytest.raises(ValueError, match="fast-weight checkpoint.*base-only"):
        inspect_tokens(model.base, tokenizer, [tokenizer.eot_id], Schedule(), "base")


class _SourceText(html.parser.HTMLParser):
    """The text inside ``<pre id="source">`` (the browser's DOM, so entities already resolved once)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.text, self.ids = 0, [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if self.depth or (tag == "pre" and attrs.get("id") == "source"):
            self.depth += 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)


def test_page_in_headless_chromium(inspections, tmp_path):
    chromium = require_tool("chromium")
    inspection = inspections["random"]
    page = tmp_path / "page.html"
    page.write_text(render_html(inspection, note="test page"), encoding="utf-8")
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path).stdout
    parsed = _SourceText()
    parsed.feed(dom)
    # The browser keeps the text exactly (CR LF included, as a parsed DOM reports it: HTML folds CR LF into LF).
    assert "".join(parsed.text) == SOURCE.replace("\r\n", "\n").replace("\r", "\n")
    assert "legend" in parsed.ids and "chunks" in parsed.ids
    assert {f"c{c.index}" for c in inspection.chunks} <= parsed.ids
    assert "Legend" in dom and "skipped" in dom and "updated" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "viewer.png"
    shot.unlink(missing_ok=True)
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50
        assert any(r > 200 and 120 < g < 230 and b < 150 for _, (r, g, b) in colours), "no updated (orange) chunk shows"


def test_inspect_command_writes_a_page(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(SOURCE, encoding="utf-8", newline="")
    out = tmp_path / "page.html"
    run = subprocess.run([sys.executable, "-m", "ponder", "inspect", str(source), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    page = out.read_text(encoding="utf-8")
    assert "Keep &lt;value&gt; &amp; friends" in page and "sample.py" in page
    assert f"wrote {out}" in run.stderr

    binary = tmp_path / "blob.py"
    binary.write_bytes(b"x = '\xff\xfe'\n")
    run = subprocess.run([sys.executable, "-m", "ponder", "inspect", str(binary)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and f"{binary} is not UTF-8" in run.stderr


def test_ui_page_of_a_live_session(live_server):
    url = live_server.url
    session = "viewer-test"
    answer = httpx.post(url + "/v1/completions", json={"prompt": SOURCE, "max_tokens": 2, "session_id": session},
                        timeout=120)
    assert answer.status_code == 200, answer.text
    page = httpx.get(url + "/ui", params={"session_id": session}, timeout=300)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    parsed = _SourceText()
    parsed.feed(page.text)
    shown = "".join(parsed.text)
    # The committed document is the prompt's whole chunks (at least two here): a prefix of the prompt.
    assert len(shown) > 100 and SOURCE.startswith(shown), shown
    assert "session viewer-test" in page.text and "legend" in parsed.ids

    missing = httpx.get(url + "/ui", params={"session_id": "no-such-session"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "session_id"
    no_id = httpx.get(url + "/ui", timeout=30)
    assert no_id.status_code == 400 and no_id.json()["error"]["param"] == "session_id"
    assert "session_id" in no_id.json()["error"]["message"]

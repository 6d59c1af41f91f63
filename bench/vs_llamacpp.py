"""ponder against llama.cpp on the same weights: decode, prefill, served streams, TTFT, memory.

For each checkpoint (``NAME=DIR``; default ``tiny`` = the bundled one), the
base GPT-2 is exported to Hugging Face format (``ponder convert --to-hf``)
and then to GGUF, f32 and q8_0, with the converter llama.cpp vendors in the
``llama-cpp-python`` sdist (built by ``bench/setup_llamacpp.sh``). ponder's
own BPE is not among the converter's known pre-tokenizers (it recognises
them by hashing the tokens of a test string), so GPT-2's pre-tokenizer is
named for it: ponder splits text as GPT-2 does.

Then, all in one run on the same machine:

* single-stream decode and prefill: ``llama-bench`` (tg, pp) on both GGUFs
  against ``bench/weights.py`` on the checkpoint's base with float32,
  bfloat16 and int8 weights (TTT off; decode is end to end from a 32-token
  prompt, prefill 512 tokens); int8 is compared with q8_0, the others with f32;
* served: ``ponder serve`` (``--schedule skip``, TTT off, and ``learned``;
  ``--served-weights`` formats) and ``llama-server`` on the f32 GGUF with the same slots and context per
  slot, under ``bench/serve_load.py``'s throughput load (1 stream, then N
  simultaneous streams of ``--max-tokens`` greedy tokens from
  ``--prompt-tokens``-token prompts): aggregate decode tokens/s, per-stream
  decode, TTFT p50, and the server's resident memory afterwards.

Prints one table (and ``--json``). A benchmark, never run by CI.

    bench/setup_llamacpp.sh
    python bench/vs_llamacpp.py --checkpoint tiny=checkpoints/default --checkpoint 124M=/tmp/gpt2 [--streams 4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import serve_load

from ponder.client import Completion, Delta, Health, PonderError, Usage

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

# Runs llama.cpp's converter with GPT-2's pre-tokenizer named (argv: SRC HF_DIR OUT OUTTYPE).
CONVERT = """
import runpy, sys
src, hf, out, outtype = sys.argv[1:]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", outtype]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def to_gguf(checkpoint: str, src: Path, work: Path, name: str) -> dict[str, Path]:
    """The checkpoint's base as GGUF files, by precision (f32, q8_0)."""
    hf = work / f"{name}-hf"
    subprocess.run(["ponder", "convert", "--to-hf", checkpoint, "--out", str(hf), "--overwrite"], check=True,
                   env=os.environ | {"PATH": f"{Path(PY).parent}:{os.environ['PATH']}"})
    out = {}
    for outtype in ("f32", "q8_0"):
        out[outtype] = work / f"{name}-{outtype}.gguf"
        subprocess.run([PY, "-c", CONVERT, str(src), str(hf), str(out[outtype]), outtype], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prefill: int, decode: int) -> dict:
    """``llama-bench``'s prefill (pp) and decode (tg) tokens/s."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prefill),
                          "-n", str(decode), "-r", "3", "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pick = lambda key: next(r["avg_ts"] for r in rows if r[key] > 0 and r["n_gen" if key == "n_prompt" else "n_prompt"] == 0)
    return {"prefill_tok_s": pick("n_prompt"), "decode_tok_s": pick("n_gen")}


def ponder_decode(checkpoint: str, work: Path, name: str, prefill: int, new_tokens: int) -> dict:
    """``bench/weights.py`` on the checkpoint's base (TTT off): decode and prefill per weight format."""
    out = work / f"{name}-weights.json"
    subprocess.run([PY, str(HERE / "weights.py"), "--checkpoint", checkpoint, "--speed-only", "--new-tokens",
                    str(new_tokens), "--prefill-tokens", str(prefill), "--runs", "3", "--json", str(out)], check=True,
                   cwd=HERE, stdout=subprocess.DEVNULL)
    return {f"ponder {weights}": r for weights, r in json.loads(out.read_text())["speed"].items()}


class LlamaClient:
    """``serve_load``'s client interface on ``llama-server``'s ``/completion`` (streamed)."""

    def __init__(self, url: str):
        self.address, self.http = url, httpx.AsyncClient(base_url=url, timeout=600)

    async def health(self, timeout: float = 5) -> Health:
        try:
            ok = (await self.http.get("/health", timeout=timeout)).status_code == 200
        except httpx.HTTPError as err:
            raise PonderError(str(err)) from err
        return Health("ok" if ok else "loading")

    async def stream(self, prompt, suffix=None, *, session=None, document=None, max_tokens=16, temperature=0.0):
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": temperature, "stream": True,
                "ignore_eos": True, "cache_prompt": True}
        async with self.http.stream("POST", "/completion", json=body) as response:
            if response.status_code != 200:
                err = PonderError(f"llama-server answered {response.status_code}")
                err.status = str(response.status_code)
                raise err
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                if event.get("content"):
                    yield Delta(event["content"], tokens=1)
                if event.get("stop"):
                    usage = Usage(event.get("tokens_evaluated", 0), event.get("tokens_cached", 0), event.get("tokens_predicted", 0))
                    yield Completion(event.get("content", ""), "length", "", usage, 0, 0, 0.0, ())
                    return

    async def aclose(self) -> None:
        await self.http.aclose()


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def served(client, args, streams: list[int]) -> dict:
    """1 stream, then each count of ``streams``: aggregate / per-stream decode and TTFT p50."""
    load = serve_load.parse_args(["--mode", "throughput", "--prompt-tokens", str(args.prompt_tokens),
                                  "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds)])
    files = serve_load.load_files(int(args.prompt_tokens * serve_load.CHARS_PER_TOKEN), load.max_file_chars)
    await serve_load.wait_ready(client, 900)
    out = {}
    for n in streams:
        load.concurrency = n
        r = await serve_load.run_throughput(client, files, load)
        out.setdefault(1, r["single"])
        out[n] = r["concurrent"]
    return {n: {k: row[k] for k in ("aggregate_tok_s", "per_stream_tok_s", "ttft_p50_s")} for n, row in out.items()}


def serve_and_load(command: list[str], client, args, streams: list[int]) -> dict:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = asyncio.run(served(client, args, streams))
        result["resident_mib"] = resident_mib(server.pid)
        return result
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", help="NAME=DIR (repeatable; default tiny=checkpoints/default)")
    parser.add_argument("--llamacpp-dir", default=os.environ.get("PONDER_LLAMACPP_DIR", str(Path.home() / ".cache/ponder-llamacpp")))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--streams", default="8", help="simultaneous streams after the single one, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=440)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--schedules", default="skip,learned", help="ponder serve --schedule values to run")
    parser.add_argument("--served-weights", default="float32", help="ponder serve --weights values to run")
    parser.add_argument("--no-serve", action="store_true", help="single-stream figures only")
    parser.add_argument("--json")
    args = parser.parse_args()

    llama = Path(args.llamacpp_dir)
    bin_dir, src = llama / "build" / "bin", llama / "src"
    if not (bin_dir / "llama-server").exists():
        raise SystemExit(f"no llama-server in {bin_dir}: run bench/setup_llamacpp.sh {llama} first")
    checkpoints = dict(c.split("=", 1) for c in (args.checkpoint or [f"tiny={ROOT / 'checkpoints' / 'default'}"]))
    checkpoints = {name: str(Path(path).resolve()) for name, path in checkpoints.items()}  # the tools run elsewhere
    streams = [int(s) for s in args.streams.split(",")]
    results, load_start = {}, os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, checkpoint in checkpoints.items():
            gguf = to_gguf(checkpoint, src, work, name)
            r = results[name] = {"llama.cpp f32": llama_bench(bin_dir, gguf["f32"], args.threads, args.prefill_tokens, args.max_tokens),
                                 "llama.cpp q8_0": llama_bench(bin_dir, gguf["q8_0"], args.threads, args.prefill_tokens, args.max_tokens),
                                 **ponder_decode(checkpoint, work, name, args.prefill_tokens, args.max_tokens)}
            if args.no_serve:
                continue
            port = 18080
            for schedule in args.schedules.split(","):
                for weights in args.served_weights.split(","):
                    command = [str(Path(PY).parent / "ponder"), "serve", "--checkpoint", checkpoint, "--port", str(port),
                               "--grpc-port", "0", "--slots", str(args.slots), "--schedule", schedule, "--weights", weights]
                    r[f"ponder served {schedule} {weights}"] = serve_and_load(
                        command, serve_load.AsyncClient(url=f"http://127.0.0.1:{port}", retries=0), args, streams)
            command = [str(bin_dir / "llama-server"), "-m", str(gguf["f32"]), "-t", str(args.threads), "--port", str(port),
                       "-np", str(args.slots), "-c", str(args.slots * 1024), "-cb"]
            r["llama.cpp served f32"] = serve_and_load(command, LlamaClient(f"http://127.0.0.1:{port}"), args, streams)
    results["load_average"] = {"start": load_start, "end": os.getloadavg()}
    print_table(results, streams, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_table(results: dict, streams: list[int], args) -> None:
    load = results.pop("load_average")
    print(f"load average (1, 5, 15 min) at the start {load['start']}, at the end {load['end']}; {args.threads} threads\n")
    print(f"| model | system | decode tok/s (tg{args.max_tokens}, 1 stream) | prefill tok/s ({args.prefill_tokens}) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        # Each ponder format against llama.cpp's of the same bytes: float32 and bfloat16 against f32, int8 against q8_0.
        for system in ("ponder float32", "ponder bfloat16", "ponder int8", "llama.cpp f32", "llama.cpp q8_0"):
            other = {"ponder int8": "llama.cpp q8_0"}.get(system, "llama.cpp f32")
            ratio = lambda key: f" ({r[system][key] / r[other][key]:.2f}x {other})" if system.startswith("ponder") else ""
            print(f"| {name} | {system} | {r[system]['decode_tok_s']:.1f}{ratio('decode_tok_s')} "
                  f"| {r[system]['prefill_tok_s']:.0f}{ratio('prefill_tok_s')} |")
    head = " | ".join(f"{n} stream{'s' * (n > 1)}: aggregate / per stream tok/s, TTFT p50" for n in [1, *streams])
    print(f"\nserved, {args.prompt_tokens}-token prompts, {args.max_tokens} tokens, {args.slots} slots\n")
    print(f"| model | server | {head} | resident MiB |")
    print("|---" * (3 + len(streams)) + "|---|")
    for name, r in results.items():
        for system, row in r.items():
            if not system.startswith(("ponder served", "llama.cpp served")):
                continue
            cells = [f"{row[n]['aggregate_tok_s']:.1f} / {row[n]['per_stream_tok_s']:.1f}, {1e3 * row[n]['ttft_p50_s']:.0f} ms"
                     for n in [1, *streams]]
            print(f"| {name} | {system} | " + " | ".join(cells) + f" | {row['resident_mib']:.0f} |")


if __name__ == "__main__":
    main()

"""Peak memory of a real ComfyUI host running the pack's streaming workflow, versus video length (tiny models).

For each frame count: a generated clip, a fresh ComfyUI server (``main.py --cpu`` from ``--tree`` run by
``--venv``'s python, this repository linked into a throw-away ``custom_nodes/``), one prompt — the core
streaming workflow's twin (``tests/workflows_api/STAR_upscale_core_video.json``: Load Video → STAR Encode Video →
STAR Sampler → STAR Decode Video → Save Video) with the tiny random models (``workflow_twins.tiny_models``, the
narrow SVD VAE through STAR VAE Loader) and a short sampler — then the server's peak RSS (``VmHWM`` of its
process) and its RSS after start-up. The first prompt's peak includes loading the models (the text encoder
dominates); the server's peak counter is then reset (``/proc/PID/clear_refs``) and the prompt queued again with
another seed, which ComfyUI runs with the models and text contexts cached: ``run peak`` is the streaming run
alone. ComfyUI itself is not part of this repository: point ``--tree``/``--venv`` at a local host.

    python bench/comfy_host_rss.py --tree ~/ComfyUI --venv ~/ComfyUI/venv [--frames 16 64 256]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import workflow_twins  # noqa: E402

TWIN = workflow_twins.API_DIR / "STAR_upscale_core_video.json"
SAMPLER = {"solver_mode": "normal", "steps": 2, "cfg": 1.0, "chunk_length": 8}


def prompt_for(clip: str, scale: float, seed: int = 666) -> dict:
    """The core streaming twin on the tiny models, with the narrow VAE and a short sampler (memory is measured)."""
    prompt = workflow_twins.tiny_models(json.loads(TWIN.read_text()), input_file=clip)
    for node in prompt.values():
        if node["class_type"] == "VAELoader":
            node["class_type"], node["inputs"] = "STARVAELoader", {"vae_name": "svd_vae_tiny.safetensors"}
        if node["class_type"] == "STARSampler":
            node["inputs"].update(SAMPLER)
        if node["class_type"] == "STARVideoEncode":
            node["inputs"].update(scale=scale, seed=seed)
    return prompt


def _http(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read() or b"null")


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _run(url: str, server: subprocess.Popen, prompt: dict, frames: int) -> tuple[float, int]:
    """Queues a prompt, waits for it; returns (seconds, server VmHWM in kB)."""
    started = time.perf_counter()
    prompt_id = _http(url + "/prompt", {"prompt": prompt})["prompt_id"]
    while True:
        time.sleep(1)
        entry = _http(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        if server.poll() is not None:
            raise RuntimeError("ComfyUI died while running; see its server.log")
    if entry["status"].get("status_str") != "success":
        errors = [m[1].get("exception_message") for m in entry["status"].get("messages", [])
                  if m[0] == "execution_error"]
        raise RuntimeError(f"the workflow failed on {frames} frames: {errors}")
    return time.perf_counter() - started, _status_kb(server.pid, "VmHWM")


def measure(frames: int, args, models: Path, work: Path) -> dict:
    """One fresh server, one prompt on a `frames`-frame clip: peak and start-up RSS, seconds, output frames."""
    from star_core.video_io import probe_video, write_synthetic_clip

    base = work / f"host_{frames}"
    for sub in ("custom_nodes", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "star_vsr").symlink_to(REPO)
    (base / "models").symlink_to(models.resolve())
    clip = write_synthetic_clip(base / "input" / f"clip_{frames}.mp4", frames=frames, width=args.width,
                                height=args.height)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(base / "server.log", "w")
    server = subprocess.Popen([str(Path(args.venv) / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
                               "--port", str(port), "--base-directory", str(base), "--database-url",
                               f"sqlite:///{base}/comfyui.db", "--disable-auto-launch", "--disable-api-nodes"],
                              cwd=args.tree, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                _http(url + "/system_stats")
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited at start-up; see {base / 'server.log'}")
                time.sleep(1)
        start_kb = _status_kb(server.pid, "VmRSS")
        seconds, peak_kb = _run(url, server, prompt_for(clip.name, args.scale), frames)
        with open(f"/proc/{server.pid}/clear_refs", "w") as f:
            f.write("5")  # reset the server's VmHWM to its current RSS
        loaded_kb = _status_kb(server.pid, "VmRSS")
        run_seconds, run_peak_kb = _run(url, server, prompt_for(clip.name, args.scale, seed=667), frames)
        saved = next((base / "output").rglob("*.mp4"))
        return {"frames": frames, "peak_mb": peak_kb / 1024, "startup_mb": start_kb / 1024, "seconds": seconds,
                "loaded_mb": loaded_kb / 1024, "run_peak_mb": run_peak_kb / 1024, "run_seconds": run_seconds,
                "output_frames": probe_video(saved).frame_count}
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", required=True, help="ComfyUI source tree (holds main.py)")
    parser.add_argument("--venv", required=True, help="virtual environment that runs it")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--models", type=Path, help="tiny models tree (default: python -m star_core.tiny_models "
                                                    "into a temp folder)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="star_host_bench_") as tmp:
        work = Path(tmp)
        models = args.models
        if models is None:
            from star_core.tiny_models import write_tree

            models = work / "models"
            write_tree(models, ["star", "vae_tiny", "clip_h"])
        version = (Path(args.tree) / "comfyui_version.py").read_text().split('"')[1]
        rows = [measure(f, args, models, work) for f in args.frames]
    if args.json:
        for row in rows:
            print(json.dumps({"comfyui": version, **row}))
        return 0
    size = f"{args.width}x{args.height} x{args.scale:g}"
    print(f"ComfyUI {version}, streaming workflow (tiny models), {size}, server process")
    print("| frames | peak RSS, first prompt (MB) | RSS after start-up (MB) | RSS, models loaded (MB) | "
          "run peak, second prompt (MB) | first / second prompt (s) | frames written |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['frames']} | {row['peak_mb']:.0f} | {row['startup_mb']:.0f} | {row['loaded_mb']:.0f} | "
              f"{row['run_peak_mb']:.0f} | {row['seconds']:.0f} / {row['run_seconds']:.0f} | "
              f"{row['output_frames']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

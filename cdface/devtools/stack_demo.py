"""The main job: the whole stack on localhost, with a demo on real photos.

    python -m cdface.devtools.stack_demo                  (what `make demo` runs; Ctrl-C or SIGTERM stops the stack)
    python -m cdface.devtools.stack_demo --once           (run the demo, then stop everything: tests, CI)
    python -m cdface.devtools.stack_demo --model DIR      (serve your own export: a directory with
                                                           model.onnx + manifest.json)

What comes up: a real ``tritonserver`` (the one bundled in nvidia-pytriton, Python backend running
the ONNX model in ONNX Runtime) with a model repository, and the cdface gateway with a SQLite
gallery. The model served is, in order: ``--model``; else the newest export under ``exports/``
(where you put the models you trained and exported); else OpenCV Zoo's SFace wrapped into the
cdface contract, since no face data set exists here to train a real face model on.

The demo enrolls people from real photos, then identifies and verifies other photos of them through
the Python client (``cdface.client``), printing each call as the line you would write (identify also
as a curl line you can copy while the stack keeps running).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cdface.core.errors import CdfaceError, exit_on_error
from cdface.devtools.commands import Command, cdface, run
from cdface.devtools.processes import die_with_parent, dies_with_this_process

MODEL_NAME = "face"


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. Like the servers (uvicorn, tritonserver) this
    binds with SO_REUSEADDR, so the TIME_WAIT connections a stopped server leaves do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_port(preferred: int) -> int:
    """The usual port when it is free (copyable curl lines), else any free one."""
    if preferred and port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, what: str, log: Path, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CdfaceError(f"{what} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise CdfaceError(f"{what} not ready after {timeout_s:.0f} s; see {log}")


def crop_keys(work: Path) -> str:
    """The demo's key that seals retained crops (without one the gateway keeps none): made once into a file
    only its owner can read, reused by later runs."""
    path = work / "crop-keys"
    if not path.exists():
        from cdface.serving.crop_cipher import new_key

        partial = path.with_name(path.name + ".tmp")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key() + "\n")
        os.replace(partial, path)  # whole or absent: a half-written key would stop the gateway
    return path.read_text().strip()


def choose_model(requested: Path | None, work: Path) -> tuple[Path, str]:
    if requested is not None:
        if not (requested / "manifest.json").is_file():
            raise CdfaceError(f"{requested} is not an exported model (no manifest.json)")
        return requested, "your export (--model)"
    exports = sorted((p.parent for p in Path("exports").glob("*/manifest.json")), key=lambda p: p.stat().st_mtime)
    if exports:
        return exports[-1], "your newest export under exports/"
    sface = work / "sface"
    if not (sface / "manifest.json").is_file():
        run("no trained export yet: wrap OpenCV Zoo's SFace (a real pretrained face model) into the cdface contract",
            cdface("export", "wrap-sface", "--out", str(sface)), capture=True)
    return sface, "SFace (OpenCV Zoo, 128-d), since no export of yours was found under exports/"


# The signals that end the demo in an orderly way: SIGTERM (`kill`, and what make forwards to its
# recipe when it is itself terminated) and SIGHUP (the terminal went away). Ctrl-C is KeyboardInterrupt.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _exit_on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    # SystemExit unwinds through main()'s `finally`, which stops the stack; 128 + n is the shell's convention.
    print(f"\n{signal.Signals(signum).name}: stopping the stack", flush=True)
    raise SystemExit(128 + signum)


class Stack:
    """Triton + gateway as child processes, stopped together.

    Each child runs in its own session (a Ctrl-C in the terminal reaches only the demo, which then
    stops them in order) and gets SIGTERM from the kernel if the demo dies without stopping them
    (killed with SIGKILL): no server is left holding the ports.
    """

    def __init__(self, work: Path):
        self.work = work
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: Command, log: Path, env: dict | None = None) -> subprocess.Popen:
        print(f"\n== start {name}\n$ {command.shown}   (log: {log})", flush=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=dies_with_this_process())
        self.processes.append((name, proc))
        print(f"   (pid {proc.pid})", flush=True)
        return proc

    def stop(self) -> None:
        # A second SIGTERM (make and a user both sending one) must not cut the stopping short.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for name, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            print(f"stopped {name}", flush=True)
        self.processes.clear()


def show_call(method: str, url: str, *, files: dict[str, Path] | None = None,
              form: dict[str, str] | None = None, body: dict | None = None) -> None:
    parts = ["curl", "-s", "-X", method, "-H", '"Authorization: Bearer $CDFACE_KEY"']
    for field, path in (files or {}).items():
        parts += ["-F", f"{field}=@{path}"]
    for field, value in (form or {}).items():
        parts += ["-F", f"{field}={value}"]
    if body is not None:
        parts += ["-H", "'Content-Type: application/json'", "-d", shlex.quote(json.dumps(body))]
    print("$ " + " ".join(parts + [url]), flush=True)


def demo_calls(base: str, key: str, photos: dict[str, Path]) -> dict:
    """Enroll, identify, verify through the Python client (``cdface.client``): each call printed as
    the line you would write, answered in one line; identify also as the equivalent curl request."""
    from cdface.client import Client, FaceImage

    def show(call: str) -> None:
        print(f">>> {call}", flush=True)

    print(f"\n>>> from cdface.client import Client, FaceImage\n>>> client = Client({base!r}, api_key={key!r})")
    client = Client(base, api_key=key, timeout=120)
    print("\n== enroll: one identity per person, a face from a photo (detected and aligned by the gateway)")
    people = {"obama": ("Barack Obama", "obama"), "biden": ("Joe Biden", "biden")}
    ids = {}
    for person, (name, photo) in people.items():
        show(f"person = client.create_identity(external_id={person!r}, name={name!r})")
        ids[person] = client.create_identity(external_id=person, name=name).id
        show(f"client.enroll(person.id, {str(photos[photo])!r})")
        client.enroll(ids[person], photos[photo])
        print(f"   enrolled {name} as {ids[person]}")

    print("\n== enroll every face of a group photo as its own identity (detect, then one face each by landmarks)")
    show(f"faces = client.detect({str(photos['t1'])!r}, mode='detect_all').faces")
    faces = client.detect(photos["t1"], mode="detect_all").faces
    show("for i, face in enumerate(faces): client.enroll(client.create_identity(external_id=f't1-person-{i + 1}').id, "
         "FaceImage(photo, mode='landmarks', landmarks=face.landmarks))")
    for i, face in enumerate(faces):
        ident = client.create_identity(external_id=f"t1-person-{i + 1}").id
        client.enroll(ident, FaceImage(photos["t1"], mode="landmarks", landmarks=face.landmarks))
    print(f"   {len(faces)} faces found in {photos['t1'].name}, each enrolled separately")

    results: dict[str, Any] = {"ids": ids, "group_faces": len(faces), "identify": {}}
    print("\n== identify (1:N): who is in these other photos?  (each also as curl, with "
          f"$ export CDFACE_KEY={key})")
    for probe in ("obama2", "obama3"):
        show(f"client.identify({str(photos[probe])!r}, top_k=3)")
        show_call("POST", base + "/v1/identify", files={"image": photos[probe]}, form={"top_k": "3"})
        answer = client.identify(photos[probe], top_k=3)
        face = answer.faces[0]
        best = face.candidates[0]
        verdict = f"match: {face.match.name or face.match.external_id}" if face.match else "no match"
        print(f"   {photos[probe].name}: {verdict} (similarity {best.similarity:.3f}, threshold "
              f"{answer.threshold:.3f}, {answer.threshold_source})")
        results["identify"][probe] = face.match.external_id if face.match else None

    print("\n== verify (1:1): Obama's photo against Biden's, and a new Obama photo against the enrolled Obama")
    show(f"client.verify({str(photos['obama'])!r}, other={str(photos['biden'])!r})")
    versus = client.verify(photos["obama"], other=photos["biden"])
    print(f"   obama.jpg vs biden.jpg: match={versus.match} (similarity {versus.similarity:.3f})")
    show(f"client.verify({str(photos['obama3'])!r}, identity_id={ids['obama']!r})")
    same = client.verify(photos["obama3"], identity_id=ids["obama"])
    print(f"   obama3.jpg vs identity {ids['obama']}: match={same.match} (similarity {same.similarity:.3f})")
    results["verify_obama_biden"] = versus.match
    results["verify_obama3_obama"] = same.match
    client.close()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work/demo"))
    parser.add_argument("--model", type=Path, default=None, help="an export directory (model.onnx + manifest.json)")
    parser.add_argument("--once", action="store_true", help="stop the stack after the demo")
    parser.add_argument("--port", type=int, default=8080, help="gateway port (another free one if taken; 0: any)")
    args = parser.parse_args(argv)
    stack = Stack(args.workdir.resolve())
    # From here on SIGTERM/SIGHUP unwind through `finally`: whatever has started is stopped.
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in STOP_SIGNALS}
    try:
        return run_demo(args, stack)
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(args: argparse.Namespace, stack: Stack) -> dict:
    """Prepare the model, the repository and a key; start Triton and the gateway; run the demo calls."""
    work = stack.work
    work.mkdir(parents=True, exist_ok=True)

    from cdface.core import assets

    photos = assets.photos()
    export_dir, why = choose_model(args.model, work)
    repo = work / "models"
    if not (repo / MODEL_NAME).exists():
        run("a Triton model repository with that model as version 1 (Python backend: ONNX Runtime on CPU)",
            cdface("export", "triton", str(repo), str(export_dir), "--model", MODEL_NAME, "--backend", "python"),
            capture=True)

    db = work / "gallery.db"
    if db.exists():  # a fresh gallery each run: the demo enrolls the same people again
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    key = run("an API key (printed once; only its hash is stored), in a new gallery database",
              cdface("keys", "create", "--name", "demo", "--scope", "admin", "--db", str(db), "--create"),
              capture=True).strip().splitlines()[-1]

    http, grpc, metrics, gateway_port = pick_port(8100), pick_port(8101), pick_port(8102), pick_port(args.port)
    triton = stack.start("Triton Inference Server", cdface(
        "triton", "serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
        "--metrics-port", str(metrics)), work / "triton.log")
    wait_http(f"http://127.0.0.1:{http}/v2/health/ready", triton, "tritonserver", work / "triton.log")
    env = {**os.environ, "CDFACE_SERVE_LOG_LEVEL": "warning", "CDFACE_SERVE_CROP_KEYS": crop_keys(work)}
    gateway = stack.start("gateway", cdface(
        "serve", "--port", str(gateway_port), "--db", str(db), "--model-repository", str(repo),
        "--model", MODEL_NAME, "--triton-url", f"127.0.0.1:{grpc}"), work / "gateway.log", env)
    base = f"http://127.0.0.1:{gateway_port}"
    wait_http(base + "/readyz", gateway, "gateway", work / "gateway.log")
    print(f"\nserving model: {why}\n  {export_dir}")
    results = demo_calls(base, key, photos)
    print(f"\nThe stack is up: gateway {base} (web page {base}/ui, API docs {base}/docs), "
          f"Triton http://127.0.0.1:{http}, metrics {base}/metrics.\nexport CDFACE_KEY={key}")
    if not args.once:
        print("Ctrl-C (or SIGTERM) stops it.", flush=True)
        try:
            while all(p.poll() is None for _, p in stack.processes):
                time.sleep(1)
            raise CdfaceError("a stack process exited; see the logs in " + str(work))
        except KeyboardInterrupt:
            pass
    return results

if __name__ == "__main__":
    # Run as a program (`make demo`): if make or the shell that started the demo goes away, the demo
    # gets SIGTERM and stops its stack, rather than running on as an orphan.
    die_with_parent(os.getppid())
    exit_on_error(main, "cdface demo")

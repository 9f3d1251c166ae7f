"""Run the ia3tools command line with deterministic faults injected at named steps.

    python tests/faults.py STEP[,STEP...] -- ia3tools arguments...

Used by the tests to kill or signal a real process exactly between two steps of a run, rather than
hoping that a signal sent from outside lands at the right moment.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path


def _after(module, name, action, when=lambda *args: True, once=True):
    """Replace ``module.name`` so that ``action()`` runs right after a call for which ``when`` holds."""
    real = getattr(module, name)
    fired = []

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args) and not (once and fired):
            fired.append(True)
            action()
        return result

    setattr(module, name, wrapper)


def _send(sig):
    return lambda: os.kill(os.getpid(), sig)


def _wait_for(marker: Path, go: Path):
    def action():
        marker.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.01)

    return action


HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "safetensors", "peft")


class _Without:
    """An import hook for the light install: the packages of the extras are not there, and every
    attempt to import one is written to $IA3TOOLS_IMPORT_LOG."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            log = os.environ.get("IA3TOOLS_IMPORT_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(name + "\n")
            raise ImportError(f"No module named {name!r} (simulated light install)")
        return None


def install(steps: list[str]) -> None:
    if "light-install" in steps:  # first, before anything imports them
        sys.meta_path.insert(0, _Without())
        steps = [s for s in steps if s != "light-install"]
    import ia3tools.atomic as atomic
    import ia3tools.publish as publish
    import ia3tools.write as write

    for step in steps:
        if step == "no-exchange":  # a kernel or filesystem without renameat2(RENAME_EXCHANGE)
            publish.exchange = lambda a, b: False
        elif step == "no-renameat2":  # nor renameat2 at all
            atomic.rename_call = lambda name, a, b, flags: None
        elif step == "kill-after-move-aside":  # --force fallback: OUT moved to .old, new not yet in place
            _after(os, "rename", _send(signal.SIGKILL), when=lambda a, b: str(b).endswith(".old"))
        elif step == "kill-after-swap-in":  # --force fallback: new in place, old not yet removed
            _after(publish, "rename_noreplace", _send(signal.SIGKILL), when=lambda a, b: str(a).endswith(".new"))
        elif step == "kill-after-exchange":  # --force: swapped, old (now in staging) not yet removed
            _after(publish, "exchange", _send(signal.SIGKILL))
        elif step.endswith("-while-writing"):  # the first block written to a shard
            sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "hup": signal.SIGHUP, "int": signal.SIGINT}
            _after(write, "_pwrite_all", _send(sig[step.split("-")[0]]), when=lambda fd, data, offset: offset > 0)
        elif step.startswith("pause-before-publish="):  # writes MARKER, waits for MARKER.go
            marker = Path(step.partition("=")[2])
            real = publish.Staging.publish

            def publish_after_pause(self, validate, _marker=marker, _real=real):
                _wait_for(_marker, Path(f"{_marker}.go"))()
                return _real(self, validate)

            publish.Staging.publish = publish_after_pause
        else:
            raise SystemExit(f"unknown fault step {step!r}")


if __name__ == "__main__":
    steps, _, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    install(steps.split(","))
    sys.argv = ["ia3tools", *args]
    assert threading.current_thread() is threading.main_thread()
    from ia3tools.cli import main

    main()

"""result.json in the schema of PEFT's method_comparison results (run_info / train_info / meta_info), plus the
environment facts every reported number needs: package versions and the machine it was measured on."""

from __future__ import annotations

import datetime as dt
import errno
import importlib.metadata as md
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..validation import nearest_existing, write_error

RESULT_FILE = "result.json"
PACKAGES = ("svfit", "peft", "transformers", "torch", "accelerate", "safetensors", "numpy")


def package_info() -> dict[str, Any]:
    info = {}
    for name in PACKAGES:
        try:
            info[f"{name}-version"] = md.version(name)
        except md.PackageNotFoundError:
            info[f"{name}-version"] = None
    return info


def system_info() -> dict[str, Any]:
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {
        "system": platform.system(),
        "release": platform.release(),
        "version": platform.version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": accelerator,
    }


def _cpu_model() -> str | None:
    """The CPU's marketing name (platform.processor() is often empty on Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def code_version() -> dict[str, Any]:
    """The svfit source a number came from beyond its version (package_info has that): the git commit when run
    from a checkout, with "dirty" when the tree had uncommitted changes."""
    info: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    here = Path(__file__).resolve().parent
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        # this very file must be tracked there: an installed copy inside some other repository is not a checkout
        if head.returncode == 0 and run("ls-files", "--error-unmatch", Path(__file__).name).returncode == 0:
            info["git_commit"] = head.stdout.strip()
            info["git_dirty"] = bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed wheel)
        pass
    return info


def machine_name(system: dict) -> str:
    """The machine as reports name it, from a recorded system_info: platform.processor() is often empty on Linux
    and falls back to the machine type, so that is named once, with the CPU model where it was recorded."""
    machine, processor = system.get("machine") or "", system.get("processor") or ""
    name = machine if processor in ("", machine) else f"{machine} {processor}"
    return f"{name} ({system['cpu_model']})" if system.get("cpu_model") else name


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process (bytes) and, with CUDA, peak accelerator memory."""
    out = {"cpu_rss_max": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # ru_maxrss is KiB on Linux
    if torch.cuda.is_available():
        out["accelerator_memory_max"] = torch.cuda.max_memory_allocated()
    return out


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def meta_info(model_name: str, dataset_name: str) -> dict[str, Any]:
    return {
        "model_info": {"name": model_name},
        "dataset_info": {"name": dataset_name},
        "package_info": package_info(),
        "code_version": code_version(),
        "system_info": system_info(),
        "pytorch_info": torch.__config__.show(),
    }


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=_jsonable)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not land before the data
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def read_result(run_dir: Path) -> dict:
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an svfit run directory (no {RESULT_FILE}); run `svfit train` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupt ({exc.msg} at line {exc.lineno}); re-run `svfit train`") from None


def held_out(final: dict) -> dict[str, Any]:
    """The held-out scores of a result's final metrics entry, whichever split they were measured on: runs made
    with --validation record "valid accuracy", others "test accuracy" (PEFT's method_comparison keys)."""
    split = "valid" if "valid accuracy" in final else "test"
    return {
        "split": split,
        "accuracy": final[f"{split} accuracy"],
        "loss": final[f"{split} loss"],
        "examples": final.get(f"{split} examples"),
    }


def check_writable(out_dir: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot be written (rather than after minutes of training)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out_dir} already holds files; choose another directory or pass --overwrite")
    ancestor = nearest_existing(out_dir)
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create --out {out_dir}: {ancestor} is a file; choose another path")
    error = write_error(ancestor)
    if error is not None:
        raise PermissionError(f"cannot write to {ancestor} ({error}); choose a writable --out directory")


@contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """Build a directory's contents in a sibling temp dir and move it into place only when complete, so an
    interrupted or failed run never leaves a half-written output."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the run dir the mode mkdir would have
    try:
        try:
            yield stage
        except Exception as exc:
            reason = _write_failure(exc)
            if reason is None:
                raise
            raise OSError(f"cannot write {out_dir}: {reason}; nothing was written (free some space or choose "
                          "another --out)") from exc
        if out_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, backup / "old")
            try:
                os.replace(stage, out_dir)
            except BaseException:
                os.replace(backup / "old", out_dir)  # put the previous run back rather than lose both
                raise
            finally:
                if not (backup / "old").exists() or out_dir.exists():
                    shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


# errors that mean "the disk refused the bytes", not "the program is wrong"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _write_failure(exc: BaseException):
    """The reason a write failed, when ``exc`` is a full / read-only / failing disk (also as safetensors reports it:
    "Error while serializing: I/O error: No space left on device (os error 28)"); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError) and "I/O error: " in str(exc):
        return str(exc).split("I/O error: ", 1)[1].split(" (os error")[0].strip()
    return None


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value"):  # enums such as PeftType / TaskType
        return obj.value
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)

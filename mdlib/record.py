"""Recording a lesson's key numbers, so that tests and the course summary can check them.

Each notebook ends by saving its numbers to ``<results dir>/<notebook>.json`` (written atomically) and
showing them as a JSON output, as the recommenders project does with scrapbook. The notebook tests run the
lesson with papermill and assert these numbers; ``mdlib course`` gathers them into one summary (README.md,
"Two commands", says where it is written).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays, paths and tuples -> plain JSON types; NaN/inf -> None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _process_umask() -> int:
    """The process' umask, read without changing it where Linux allows (``/proc/self/status``); elsewhere by
    setting and restoring it, once, at import."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Files mdlib writes get the permissions an ordinary ``open()`` would give them (0o666 less the umask), so
#: other users of a shared file system can read run outputs and caches as they can read anything else.
FILE_MODE = 0o666 & ~_process_umask()


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then ``os.replace`` it onto
    ``path``: readers, and a run killed mid-write, never see half a file. The file gets :data:`FILE_MODE`
    (``mkstemp`` alone would leave it readable by its owner only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON (:func:`to_jsonable`, sorted keys) to ``path`` atomically."""
    def write(f) -> None:
        json.dump(to_jsonable(data), f, indent=2, sort_keys=True)
        f.write("\n")

    return _write_atomic(path, write, mode="w")


def write_npz_atomic(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write plain arrays (no pickles) as an uncompressed ``.npz`` to ``path`` atomically."""
    return _write_atomic(path, lambda f: np.savez(f, **arrays))


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image as PNG to ``path`` atomically."""
    from PIL import Image

    return _write_atomic(path, lambda f: Image.fromarray(np.asarray(image, dtype=np.uint8)).save(f, format="PNG"))


class Results(dict):
    """The numbers a lesson records: a dict that saves itself as ``<results_dir>/<name>.json``.

    >>> rec = Results("01_nsd_data", "/tmp/results")   # doctest: +SKIP
    >>> rec["n_train"] = 8859
    >>> rec.save()
    """

    def __init__(self, name: str, results_dir: str | os.PathLike):
        super().__init__()
        self.name = name
        self.path = Path(results_dir) / f"{name}.json"

    def save(self, display: bool = False) -> Path:
        """Write the JSON file atomically and return its path; ``display``: also show it as a collapsible JSON
        tree in Jupyter (off by default: a lesson's numbers are printed where they are explained)."""
        path = write_json_atomic(self.path, dict(self))
        if display:
            try:
                from IPython.display import JSON, display as show

                show(JSON(to_jsonable(dict(self)), root=self.name),
                     metadata={"mdlib": {"results": self.name}})
            except ImportError:  # outside Jupyter the file is what counts
                pass
        return path


def load_results(results_dir: str | os.PathLike) -> dict[str, dict]:
    """All ``*.json`` results in a folder, keyed by notebook name."""
    out = {}
    for p in sorted(Path(results_dir).glob("*.json")):
        with open(p) as f:
            out[p.stem] = json.load(f)
    return out


def flatten_numbers(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Every number in nested results as ``(dotted key, value)``, in order: lists index as ``key[i]``.

    ``{"05": {"loss": {"stage1": 0.5}, "curve": [1, 2]}}`` -> ``[("05.loss.stage1", 0.5), ("05.curve[0]", 1.0),
    ("05.curve[1]", 2.0)]``. Booleans and strings are left out; None (JSON's NaN) is kept as NaN.
    """
    out: list[tuple[str, float]] = []
    items = results.items() if isinstance(results, Mapping) else enumerate(results)
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else (f"{prefix}.{k}" if prefix else str(k))
        if isinstance(v, (Mapping, list, tuple)):
            out.extend(flatten_numbers(v, key))
        elif v is None:
            out.append((key, math.nan))
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
            out.append((key, float(v)))
    return out


def write_numbers_csv(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Every recorded number as a two-column CSV (``key,value``), atomically: the course summary to grep."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["key", "value"])
    writer.writerows((k, repr(v)) for k, v in flatten_numbers(results))
    text = buf.getvalue()
    return _write_atomic(path, lambda f: f.write(text), mode="w")


"""Source-tree stand-in for `fastattn.kernels`.

The Triton kernels live in the repository's top-level `kernels/` folder, which an install maps to
`fastattn.kernels` (pyproject.toml, `package-dir`); an install never copies this file. Run from a
source checkout (the repository root on sys.path, as `python -m pytest` or `PYTHONPATH=.` put it),
Python finds this package instead: it points the package's search path at `kernels/`, so
`import fastattn.kernels.forward` loads the same files either way.
"""
from pathlib import Path as _Path

_SOURCE = _Path(__file__).resolve().parent.parent.parent / "kernels"
if not (_SOURCE / "__init__.py").is_file():  # pragma: no cover - a broken or partial checkout
    raise ModuleNotFoundError(f"fastattn.kernels: the kernels folder {_SOURCE} is missing",
                              name="fastattn.kernels")
__path__ = [str(_SOURCE)]

"""ncf: Neural Collaborative Filtering training (torch). Kept import-light: the CLI and
the torch-free scoring package import submodules explicitly."""

import os

__version__ = "0.1.0"

# numpy asks the kernel for transparent huge pages for arrays over 4 MB; where the kernel
# compacts memory on demand for them (THP defrag=madvise, the default), first-touching a
# fresh array stalled for 0.3-0.9 s on a fragmented heap (measured: 1.1 s -> 0.15 s to set
# up an epoch of ML-1M-half). Plain pages unless the user chose otherwise.
if "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"  # read when numpy is first imported
    import numpy

    getattr(numpy._core.multiarray, "_set_madvise_hugepage", lambda _: None)(False)  # already imported

"""ncf: Neural Collaborative Filtering training (torch). Kept import-light: the CLI and
the torch-free scoring package import submodules explicitly."""

__version__ = "0.1.0"

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Real data lives outside the repo (MovieLens may not be redistributed)."""
    return Path(os.environ.get("NCF_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {path} (set NCF_DATA)")
    return path

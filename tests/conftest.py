import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
if not REALDATA.exists():  # a clone may sit elsewhere; CI runs with shared/ beside the clone
    REALDATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "realdata"


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """Exported graphs go to a cache of this test session's own, never the user's."""
    path = tmp_path_factory.mktemp("spineseg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPINESEG_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory):
    """8 virtual patients x 2 slices at 128 x 128 (200 mm field of view)."""
    from spineseg.data.phantom_dataset import write_phantom_dataset

    out = tmp_path_factory.mktemp("ph") / "ds"
    write_phantom_dataset(out, 8, 2, size=128, spacing=1.5625, seed=3, progress=False)
    return out


@pytest.fixture(scope="session")
def realdata():
    d = REALDATA / "axial-unlabeled"
    if not d.exists():
        pytest.skip("../shared/realdata is absent")
    return d


def new_mr_dataset():
    """An empty single-frame MR image dataset with its file meta and SOP UIDs (the tests add geometry and pixels)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    return ds

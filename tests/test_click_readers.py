"""The click readers under careless or hostile input: every malformed file is a one-line ValueError that starts
with the file and names the place (row, task, shape); nothing is matched to the wrong image or dropped unsaid."""

import numpy as np
import pytest

from annotations import read_clicks
from tests.test_annotations import CLASSES, geotiff, pixels


# --------------------------------------------------------------------------- nothing left: allow_empty

def test_a_file_whose_every_click_is_on_nodata_reads_empty_when_allowed(tmp_path):
    data = np.full((3, 40, 40), 100, np.uint8)
    data[:, 0:10, 0:10] = 0
    folder = tmp_path / "nd"
    folder.mkdir()
    geotiff(folder / "a.tif", nodata=0, data=data)
    geotiff(folder / "b.tif", nodata=0)
    path = tmp_path / "clicks.csv"
    path.write_text("image,x,y,class\na.tif,2,3,road\n")
    with pytest.raises(ValueError, match=r"clicks\.csv: no click falls on a valid pixel"):
        read_clicks(path, folder, CLASSES)
    clicks = read_clicks(path, folder, CLASSES, allow_empty=True)
    assert len(clicks) == 0 and set(clicks.images) == {"a", "b"}
    assert all(len(c) == 0 for c in clicks.images.values())
    assert any("1 clicked pixels lie on nodata" in n for n in clicks.notes)
    assert any("no click falls on a valid pixel" in n for n in clicks.notes)
    path.write_text("image,x,y,class\na.tif,2,3,road\na.tif,20,20,tree\n")  # one valid click: read as ever
    clicks = read_clicks(path, folder, CLASSES, allow_empty=True)
    assert pixels(clicks.images["a"]) == {(20, 20): 2}
    assert not any("no click falls" in n for n in clicks.notes)

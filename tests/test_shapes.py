import json
from pathlib import Path

import pytest

from fastattn.shapes import gan_shape, gan_shapes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "gan_shapes.json"


def test_packaged_shapes_match_the_projects_shared_copy():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is not beside this checkout")
    shared = json.loads(SHARED.read_text())["shapes"]
    assert [s.id for s in gan_shapes()] == [row["id"] for row in shared]
    assert [s.__dict__ for s in gan_shapes()] == [
        {"headline": False, "illustrative": False, **row} for row in shared
    ]


def test_shapes_are_consistent_with_their_resolution():
    for s in gan_shapes():
        assert s.N == s.H * s.W
        assert s.M in (s.N, (s.H // 2) * (s.W // 2)), s.id
        if s.one_head_full_width:  # autoencoder mid-block attention: one head, unpooled, scaled
            assert s.M == s.N and s.scale == pytest.approx(s.C ** -0.5, rel=1e-15), s.id
        else:  # SAGAN family: q/k width C // 8, unscaled logits
            assert s.d_qk == s.C // 8 and s.scale == 1.0, s.id


def test_unknown_shape_id_names_the_known_ones():
    with pytest.raises(ValueError, match="biggan128_G"):
        gan_shape("nope")

"""Pictures of attention maps (fastattn.viz): the overlay and the PNG figure."""
import numpy as np
import pytest
import torch

import fastattn
from fastattn import save_attention_png
from fastattn.viz import attention_overlay


def test_overlay_puts_the_heat_where_the_attention_row_peaks():
    row = torch.zeros(1, 12)
    row[0, 1 * 4 + 2] = 1.0  # key pixel (1, 2) of a 3x4 key grid
    heat = attention_overlay(row, (3, 4), (6, 8))[0]
    assert heat.shape == (6, 8)
    hot = (heat == 1).nonzero().tolist()
    assert hot == [[r, c] for r in (2, 3) for c in (4, 5)]
    assert float(heat.sum()) == 4.0


def test_save_attention_png_writes_one_panel_per_query_pixel(tmp_path):
    from PIL import Image

    layer = fastattn.SelfAttention2d(16, pool=True, backend="torch")
    features = torch.randn(1, 16, 8, 8)
    image = torch.rand(3, 32, 32) * 2 - 1
    path = save_attention_png(tmp_path / "attn.png", image, layer.attention_map(features),
                              [(3, 4), (20, 30)], dpi=50)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (int(2.2 * 3 * 50), int(2.4 * 50))
        pixels = torch.from_numpy(np.asarray(png.convert("L"), dtype=np.float32))
    assert float(pixels.std()) > 1.0  # something was drawn
    with pytest.raises(ValueError, match="outside the 32x32 image"):
        save_attention_png(tmp_path / "bad.png", image, layer.attention_map(features), [(32, 0)])
    with pytest.raises(ValueError, match="query_hw and key_hw"):
        save_attention_png(tmp_path / "bad.png", image, torch.rand(64, 16), [(0, 0)])

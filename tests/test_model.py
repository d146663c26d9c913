import pytest
import torch

from lsep_tune.models.names import model_names, parse_model_name
from lsep_tune.models.sit import create_model

PUBLISHED = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@pytest.mark.parametrize("name", [n for n in model_names() if n.split("-")[1].split("/")[0] in PUBLISHED])
def test_factory_names_build_published_shapes(name):
    size, patch = name[4:].split("/")
    depth, hidden, heads = PUBLISHED[size]
    with torch.device("meta"):
        model = create_model(name)
    assert len(model.blocks) == depth
    assert model.hidden_size == hidden and model.blocks[0].attn.qkv.in_features == hidden
    assert model.blocks[0].attn.num_heads == heads
    assert model.x_embedder.proj.kernel_size == (int(patch), int(patch))
    assert model.grid_size == 32 // int(patch)
    assert model.y_embedder.embedding_table.num_embeddings == 1001  # 1000 classes + null


def test_xl2_parameter_count_matches_dit():
    with torch.device("meta"):
        model = create_model("SiT-XL/2")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 675e6) / 675e6 < 0.01  # DiT-XL/2 / SiT-XL/2: 675M


def test_overrides_and_unknown_names():
    model = create_model("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=10)
    assert model.grid_size == 4 and model.num_classes == 10
    with pytest.raises(ValueError, match="unknown model"):
        parse_model_name("SiT-XXL/2")


def test_returned_features_are_the_main_pass_tokens():
    torch.manual_seed(0)
    model = create_model("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=10).eval()
    for block in model.blocks:  # leave adaLN-Zero so blocks are not the identity
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.randint(0, 10, (5,))
    seen = {}
    handle = model.blocks[2].register_forward_hook(lambda m, i, o: seen.setdefault("k3", o.clone()))
    out, feats = model(x, t, y, return_depths=(1, 3))
    handle.remove()
    assert out.shape == x.shape and set(feats) == {1, 3}
    torch.testing.assert_close(feats[3], seen["k3"])
    # The early-stopping path (probe / teacher passes) gives the same tokens with the same labels...
    none, early = model(x, t, y, return_depths=(3,), stop_at=3)
    assert none is None
    torch.testing.assert_close(early[3], feats[3])
    # ...and different tokens with other labels.
    _, other = model(x, t, torch.full_like(y, 10), return_depths=(3,), stop_at=3)
    assert not torch.allclose(other[3], feats[3])


def test_initial_model_outputs_zero_velocity():
    model = create_model("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=10)
    out, _ = model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero output layer

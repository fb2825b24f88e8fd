"""ALBERT and DistilBERT train with `mlm` through `python -m train`: a shrunk preset logs the
same losses on one device and on a test mesh, and its loss falls. ALBERT's shared layer
sets are replicated on every mesh, never split along their stacked axis."""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import zoo
from test_parallel import RTOL
from train_util import losses_on_two_meshes

# Four heads of 8, four layers (ALBERT: over two shared sets, embeddings 16 wide).
SHRUNK = {
    "albert-base-v2": dict(d_model=32, num_heads=4, d_ff=64, num_layers=4, shared_layers=2, embed_dim=16),
    "distilbert-base-uncased": dict(d_model=32, num_heads=4, d_ff=64, num_layers=2),
}
MESH = {"albert-base-v2": "data=2,fsdp=2,tensor=2", "distilbert-base-uncased": "data=2,tensor=4"}


# DistilBERT (BERT's layer under other names, which test_parallel's tiny-encoder trains on
# every mesh) runs with -m slow: CI time.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("distilbert") else n
                                  for n in sorted(SHRUNK)])
def test_a_shrunk_preset_trains_through_the_cli_on_one_device_and_a_mesh(tmp_path, tokenizer_path, name):
    one, on_mesh, saved = losses_on_two_meshes(tmp_path, tokenizer_path, name, SHRUNK[name], MESH[name])
    assert all(getattr(saved, k) == v for k, v in SHRUNK[name].items()), saved
    np.testing.assert_allclose(on_mesh, one, rtol=RTOL)


def test_shared_layer_sets_are_replicated_along_their_stacked_axis():
    """One set for 12 layers, or 2 for 4: the leading axis is never split (a rule meant
    for a stack of num_layers would not divide it), the other axes shard as in any stack."""
    mesh = zoo.sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for shared, layers in ((1, 12), (2, 4)):
        cfg = zoo.preset("albert-base-v2", shared_layers=shared, num_layers=layers)
        shapes = jax.eval_shape(lambda: zoo.init(cfg, jax.random.key(0)))
        specs = zoo.sharding.tree_shardings(zoo.axes(cfg), mesh, shapes)["encoder"]["layers"]
        for leaf, s in zip(jax.tree.leaves(shapes["encoder"]["layers"]), jax.tree.leaves(specs)):
            assert leaf.shape[0] == shared and s.spec[0] is None, (leaf.shape, s.spec)
        assert specs["attn"]["q"].spec == P(None, "fsdp", "tensor", None)

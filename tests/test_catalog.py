"""docs/catalog.md is the page the registry generates; every mechanism is described."""

from attnlab import catalog, layers, ops
from attnlab.ops import registry


def test_every_mechanism_is_described():
  for name in ops.mechanisms():
    info = registry.info(name)
    assert info.paper and info.state and info.cost, name
    if info.step is not None:
      assert callable(getattr(ops, info.step)), (name, info.step)


def test_every_mixer_runs_a_registered_op():
  for name in layers.mixer_names():
    for op in layers.mixer_ops(layers.mixer_class(name)):
      assert op in ops.mechanisms(), (name, op)


def test_docs_catalog_matches_the_registry():
  want = catalog.markdown()
  have = catalog.PATH.read_text()
  assert have == want, ("docs/catalog.md is stale: run `python -m attnlab.catalog "
                        "--write`")

"""Tree helpers: flatten/unflatten round trip, counting, selection by glob, prefix and regex."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fdl.nn import tree as T

PARAMS = {
    "features": {
        "conv1": {"w": jnp.ones((3, 3, 1, 4)), "b": jnp.zeros(4)},
        "conv2": {"w": jnp.ones((3, 3, 4, 8)), "b": jnp.zeros(8)},
        "bn": {"scale": jnp.ones(8), "offset": jnp.zeros(8)},
    },
    "head": {"w": jnp.ones((8, 10)), "b": jnp.zeros(10)},
}


class Pair(NamedTuple):
    mu: jax.Array
    nu: jax.Array


def test_flatten_paths_and_round_trip():
    flat = T.flatten_dict(PARAMS)
    assert set(flat) == {
        "features/conv1/w", "features/conv1/b", "features/conv2/w", "features/conv2/b",
        "features/bn/scale", "features/bn/offset", "head/w", "head/b",
    }
    back = T.unflatten_dict(flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(PARAMS)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(PARAMS)):
        assert a is b
    assert T.tree_paths(PARAMS) == list(T.flatten_dict(PARAMS))  # tree_leaves order


names = st.text("abcxyz_0123", min_size=1, max_size=4)
nested = st.recursive(
    st.integers(1, 3).map(lambda n: np.arange(n, dtype=np.float32)),
    lambda children: st.dictionaries(names, children, min_size=1, max_size=3),
    max_leaves=8,
).filter(lambda t: isinstance(t, dict))


@settings(max_examples=25)
@given(tree=nested)
def test_round_trip_property(tree):
    flat = T.flatten_dict(tree)
    assert len(flat) == len(jax.tree_util.tree_leaves(tree))
    back = T.unflatten_dict(flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    assert T.count_params(tree) == sum(a.size for a in flat.values())


def test_sequences_and_namedtuples():
    state = {"opt": Pair(mu=jnp.ones(2), nu=jnp.zeros(2)), "hist": [jnp.ones(1), jnp.ones(3)]}
    flat = T.flatten_dict(state)
    assert set(flat) == {"opt/mu", "opt/nu", "hist/0", "hist/1"}
    assert T.count_params(state) == 8


def test_count_params():
    assert T.count_params(PARAMS) == 9 * 4 + 4 + 9 * 32 + 8 + 16 + 80 + 10
    assert T.count_params({}) == 0
    assert T.count_params({"s": jnp.ones(())}) == 1


def test_select_glob_prefix_regex_predicate():
    assert set(T.select(PARAMS, "*/b")) == {"features/conv1/b", "features/conv2/b", "head/b"}
    assert set(T.select(PARAMS, "features")) == {
        "features/conv1/w", "features/conv1/b", "features/conv2/w", "features/conv2/b",
        "features/bn/scale", "features/bn/offset",
    }
    assert set(T.select(PARAMS, "features/conv1")) == {"features/conv1/w", "features/conv1/b"}
    assert set(T.select(PARAMS, "features/conv*/w")) == {"features/conv1/w", "features/conv2/w"}
    assert set(T.select(PARAMS, r"re:conv\d/w$")) == {"features/conv1/w", "features/conv2/w"}
    assert set(T.select(PARAMS, r"re:^head")) == {"head/w", "head/b"}
    assert set(T.select(PARAMS, lambda p: p.endswith("scale"))) == {"features/bn/scale"}
    assert T.select(PARAMS, "nothing*") == {}
    # a prefix matches whole path components only
    assert T.select(PARAMS, "feat") == {}


def test_path_mask_structure_and_use_for_freezing():
    mask = T.path_mask(PARAMS, "features")
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(PARAMS)
    assert mask["features"]["conv1"]["w"] is True and mask["head"]["w"] is False
    grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    frozen = jax.tree_util.tree_map(lambda g, m: jnp.where(m, 0.0, g), grads, mask)
    assert float(frozen["features"]["bn"]["scale"].sum()) == 0.0
    assert float(frozen["head"]["w"].sum()) == 80.0
    rmask = T.path_mask(PARAMS, r"re:(scale|offset)$")
    assert sum(jax.tree_util.tree_leaves(rmask)) == 2


def test_map_with_path():
    out = T.map_with_path(lambda p, x: p if p.endswith("/b") else None, PARAMS)
    assert out["head"]["b"] == "head/b"
    scaled = T.map_with_path(lambda p, x: x * (0.0 if p.startswith("head") else 1.0), PARAMS)
    assert float(scaled["head"]["w"].sum()) == 0.0
    assert float(scaled["features"]["conv1"]["w"].sum()) == 36.0


def test_nn_tree_is_an_alias_of_fdl_tree():
    import fdl.tree

    for name in T.__all__:
        assert getattr(T, name) is getattr(fdl.tree, name)


def test_optim_does_not_depend_on_nn():
    import ast
    import pathlib

    import fdl.optim

    for path in pathlib.Path(fdl.optim.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "fdl.nn" or n.startswith("fdl.nn.") for n in names), path

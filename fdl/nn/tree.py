"""Path utilities over parameter trees; moved to :mod:`fdl.tree` (kept here as an alias).

``fdl.nn.tree.path_mask`` and the other names keep working; new code imports ``fdl.tree``.
"""

from fdl.tree import (
    count_params,
    flatten_dict,
    map_with_path,
    path_mask,
    select,
    tree_paths,
    unflatten_dict,
)

__all__ = [
    "flatten_dict",
    "unflatten_dict",
    "count_params",
    "select",
    "path_mask",
    "map_with_path",
    "tree_paths",
]

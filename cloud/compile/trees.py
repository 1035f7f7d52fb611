"""Hoeffding trees and forests -> one ``ai.onnx.ml.TreeEnsemble`` that yields leaf ids, plus
per-leaf tables gathered by those ids.

Why leaf ids rather than leaf values: river's leaves are not constants. A naive-Bayes leaf
computes a Gaussian likelihood of ``x``, a model leaf runs a linear model on ``x``, an adaptive
leaf picks one of two predictors. The tree ensemble routes each row to its leaf (exactly river's
``traverse``: ``<=`` on numeric splits, ``==`` on nominal ones, the most-travelled child when a
feature is missing); each tree writes its *leaf number* into its own target; everything a leaf
predicts is then computed from per-leaf tables with ``Gather``. Thresholds, leaf numbers and all
tables are float64, so routing is bit-identical to river's and values match to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river.linear_model import LinearRegression
from river.optim.losses import RegressionLoss
from river.proba.gaussian import _HALF_LOG_TAU
from river.tree.nodes.branch import (
    NominalBinaryBranch,
    NominalMultiwayBranch,
    NumericBinaryBranch,
    NumericMultiwayBranch,
)
from river.tree.nodes.htc_nodes import (
    LeafMajorityClass,
    LeafNaiveBayes,
    LeafNaiveBayesAdaptive,
)
from river.tree.nodes.htr_nodes import LeafAdaptive, LeafMean, LeafModel
from river.tree.splitter import GaussianSplitter

from cloud.compile.errors import CompileError, UnsupportedModelError
from cloud.compile.graph import ML_DOMAIN, GraphBuilder

__all__ = ["TreeSet", "classifier_tree_probas", "regressor_tree_values", "route_to_leaves"]

LEQ, EQ = 0, 4  # TreeEnsemble nodes_modes


@dataclass
class TreeSet:
    """The flattened nodes of one or more trees, in TreeEnsemble attribute order."""

    features: list[str]
    featureids: list[int] = field(default_factory=list)
    modes: list[int] = field(default_factory=list)
    splits: list[float] = field(default_factory=list)
    true_ids: list[int] = field(default_factory=list)
    true_leaf: list[int] = field(default_factory=list)
    false_ids: list[int] = field(default_factory=list)
    false_leaf: list[int] = field(default_factory=list)
    tracks_true: list[int] = field(default_factory=list)
    roots: list[int] = field(default_factory=list)
    leaves: list[Any] = field(default_factory=list)  # river leaf objects, global numbering
    leaf_tree: list[int] = field(default_factory=list)
    derived: list[tuple[int, float]] = field(default_factory=list)  # (feature index, radius)
    where: str = ""

    def add_tree(self, root: Any, where: str) -> None:
        self.where = where
        start = len(self.featureids)
        tree_no = len(self.roots)
        self.roots.append(start)
        if root is None:
            raise CompileError(f"{where}: the tree has no root (it has not learned anything yet)")
        if not hasattr(root, "children"):  # a tree that is a single leaf
            leaf = self._leaf(root, tree_no)
            self._node(0, LEQ, 0.0, (leaf, 1), (leaf, 1), 0)
            return
        self._emit(root, tree_no)

    # -- internals ------------------------------------------------------------------------
    def _leaf(self, leaf: Any, tree_no: int) -> int:
        self.leaves.append(leaf)
        self.leaf_tree.append(tree_no)
        return len(self.leaves) - 1

    def _node(
        self,
        feature: int,
        mode: int,
        split: float,
        true: tuple[int, int],
        false: tuple[int, int],
        tracks: int,
    ) -> int:
        self.featureids.append(feature)
        self.modes.append(mode)
        self.splits.append(split)
        self.true_ids.append(true[0])
        self.true_leaf.append(true[1])
        self.false_ids.append(false[0])
        self.false_leaf.append(false[1])
        self.tracks_true.append(tracks)
        return len(self.featureids) - 1

    def _placeholder(self) -> int:
        return self._node(0, LEQ, 0.0, (0, 1), (0, 1), 0)

    def _fill(
        self, i: int, feature: int, mode: int, split: float, t: tuple[int, int], f: tuple[int, int]
    ) -> None:
        self.featureids[i], self.modes[i], self.splits[i] = feature, mode, split
        self.true_ids[i], self.true_leaf[i] = t
        self.false_ids[i], self.false_leaf[i] = f

    def _feature(self, name: Any) -> int:
        try:
            return self.features.index(name)
        except ValueError:
            raise CompileError(
                f"{self.where}: the tree splits on feature {name!r}, which is not in the feature "
                f"list {self.features}"
            ) from None

    def _number(self, value: Any, what: str) -> float:
        if isinstance(value, bool | int | float):
            return float(value)
        raise UnsupportedModelError(
            f"{self.where}: {what} compares with the non-numeric value {value!r}; frames carry "
            "numbers only, so nominal splits must be on numeric codes"
        )

    def _emit(self, node: Any, tree_no: int) -> tuple[int, int]:
        """Emit ``node``; return its (global index, is_leaf) as TreeEnsemble references children."""
        if node is None:
            raise UnsupportedModelError(f"{self.where}: a branch has an empty child")
        if not hasattr(node, "children"):
            return self._leaf(node, tree_no), 1
        if isinstance(node, NumericBinaryBranch):
            i = self._placeholder()
            t = self._emit(node.children[0], tree_no)
            f = self._emit(node.children[1], tree_no)
            self._fill(i, self._feature(node.feature), LEQ, float(node.threshold), t, f)
            # a missing feature takes river's most_common_path (KeyError in Branch.walk)
            self.tracks_true[i] = 1 if _most_common(node) == 0 else 0
            return i, 0
        if isinstance(node, NominalBinaryBranch):
            i = self._placeholder()
            t = self._emit(node.children[0], tree_no)
            f = self._emit(node.children[1], tree_no)
            value = self._number(node.value, f"the split on {node.feature!r}")
            self._fill(i, self._feature(node.feature), EQ, value, t, f)
            self.tracks_true[i] = 1 if _most_common(node) == 0 else 0
            return i, 0
        if isinstance(node, NominalMultiwayBranch):
            feat = self._feature(node.feature)
            cases = [
                (self._number(v, f"the split on {node.feature!r}"), k)
                for v, k in node._mapping.items()
            ]
            return self._chain(node, feat, cases, tree_no)
        if isinstance(node, NumericMultiwayBranch):
            # river routes by floor(x / radius); the graph computes that same column exactly
            feat = len(self.features) + len(self.derived)
            self.derived.append((self._feature(node.feature), float(node.radius)))
            cases = [(float(slot), k) for slot, k in node._mapping.items()]
            return self._chain(node, feat, cases, tree_no)
        raise UnsupportedModelError(
            f"{self.where}: branch type {type(node).__name__} is not supported"
        )

    def _chain(
        self, node: Any, feat: int, cases: list[tuple[float, int]], tree_no: int
    ) -> tuple[int, int]:
        """A multiway split as a chain of ``==`` tests. The most-travelled child is the final
        'else', which is exactly where river sends unseen values and missing features."""
        common = _most_common(node)
        tests = [(v, k) for v, k in cases if k != common]
        if not tests:
            return self._emit(node.children[common], tree_no)
        first: tuple[int, int] | None = None
        prev: int | None = None
        for value, k in tests:
            i = self._placeholder()
            if prev is not None:
                self.false_ids[prev], self.false_leaf[prev] = i, 0
            else:
                first = (i, 0)
            t = self._emit(node.children[k], tree_no)
            self.featureids[i], self.modes[i], self.splits[i] = feat, EQ, value
            self.true_ids[i], self.true_leaf[i] = t
            prev = i
        assert prev is not None and first is not None
        f = self._emit(node.children[common], tree_no)
        self.false_ids[prev], self.false_leaf[prev] = f
        return first


def route_to_leaves(g: GraphBuilder, x: str, ts: TreeSet) -> str:
    """Nodes mapping ``x`` [N, F] (NaN = missing) to global leaf numbers ``int64[N, T]``."""
    cols = x
    if ts.derived:
        parts = [x]
        for feat, radius in ts.derived:
            col = g.op(
                "Slice",
                x,
                g.const("s", [feat], np.int64),
                g.const("e", [feat + 1], np.int64),
                g.const("a", [1], np.int64),
                hint="col",
            )
            parts.append(g.op("Floor", g.op("Div", col, g.const("radius", radius)), hint="slot"))
        cols = g.op("Concat", *parts, axis=1, hint="tree_input")
    n_trees = len(ts.roots)
    from onnx import numpy_helper

    leaf_numbers = np.arange(len(ts.leaves), dtype=np.float64)
    ids = g.op(
        "TreeEnsemble",
        cols,
        hint="leaf_number",
        domain=ML_DOMAIN,
        aggregate_function=1,  # SUM: each target receives exactly one leaf
        post_transform=0,
        n_targets=n_trees,
        tree_roots=ts.roots,
        nodes_featureids=ts.featureids,
        nodes_modes=numpy_helper.from_array(np.array(ts.modes, dtype=np.uint8)),
        nodes_splits=numpy_helper.from_array(np.array(ts.splits, dtype=np.float64)),
        nodes_truenodeids=ts.true_ids,
        nodes_trueleafs=ts.true_leaf,
        nodes_falsenodeids=ts.false_ids,
        nodes_falseleafs=ts.false_leaf,
        nodes_missing_value_tracks_true=ts.tracks_true,
        leaf_targetids=ts.leaf_tree,
        leaf_weights=numpy_helper.from_array(leaf_numbers),
    )
    return g.op("Cast", ids, to=7, hint="leaf_id")  # int64


# -- classifier leaves -------------------------------------------------------------------------


def _most_common(branch: Any) -> int:
    """Index of the child river follows when the split feature is missing (or unseen)."""
    return int(branch.most_common_path()[0])


def _nb_active(leaf: Any, tree: Any) -> bool:
    """Mirror of LeafNaiveBayes(Adaptive).prediction's choice between NB and majority class."""
    if not leaf.is_active():
        return False
    if isinstance(leaf, LeafNaiveBayesAdaptive):
        return bool(leaf._nb_correct_weight >= leaf._mc_correct_weight)
    if isinstance(leaf, LeafNaiveBayes):
        return bool(leaf.total_weight >= tree.nb_threshold)
    return False


def classifier_tree_probas(
    g: GraphBuilder, x: str, trees: list[Any], classes: list[Any], features: list[str], where: str
) -> str:
    """``double[N, T, C]``: each tree's predict_proba_one over the global class list."""
    ts = TreeSet(features)
    owner: list[Any] = []
    for t, tree in enumerate(trees):
        ts.add_tree(tree._root, f"{where} tree {t}" if len(trees) > 1 else where)
        owner.extend([tree] * (len(ts.leaves) - len(owner)))
    leaf_ids = route_to_leaves(g, x, ts)

    n_leaves, n_classes, n_feat = len(ts.leaves), len(classes), len(features)
    col = {c: i for i, c in enumerate(classes)}
    mc = np.zeros((n_leaves, n_classes))
    nb_flag = np.zeros(n_leaves, dtype=bool)
    prior = np.zeros((n_leaves, n_classes))
    in_leaf = np.zeros((n_leaves, n_classes), dtype=bool)
    mu = np.zeros((n_leaves, n_classes, n_feat))
    neg2var = np.ones((n_leaves, n_classes, n_feat))
    konst = np.zeros((n_leaves, n_classes, n_feat))
    valid = np.zeros((n_leaves, n_classes, n_feat), dtype=bool)

    for li, leaf in enumerate(ts.leaves):
        if not isinstance(leaf, LeafMajorityClass):
            raise UnsupportedModelError(
                f"{where}: leaf type {type(leaf).__name__} is not supported"
            )
        stats = dict(leaf.stats)
        for c in stats:
            if c not in col:
                raise CompileError(f"{where}: a leaf holds class {c!r} the tree does not list")
        total = sum(stats.values())
        # LeafMajorityClass.prediction: normalize_values_in_dict (value * (1 / total)), or the
        # raw weights when the total is 0
        for c, w in stats.items():
            mc[li, col[c]] = w * (1 / total) if total != 0 else w
        if not (_nb_active(leaf, owner[li]) and stats and total != 0):
            continue
        nb_flag[li] = True
        for c, w in stats.items():
            ci = col[c]
            in_leaf[li, ci] = True
            if w <= 0:
                continue  # river votes 0.0 for it and adds no likelihood
            prior[li, ci] = math.log(w / total)
        for att, splitter in (leaf.splitters or {}).items():
            if not isinstance(splitter, GaussianSplitter):
                raise UnsupportedModelError(
                    f"{where}: naive-Bayes leaves are compiled for GaussianSplitter attribute "
                    f"observers only; feature {att!r} uses {type(splitter).__name__}. Use "
                    "leaf_prediction='mc' or the default splitter"
                )
            if att not in features:
                raise CompileError(
                    f"{where}: a naive-Bayes leaf uses feature {att!r}, which is not in the "
                    f"feature list {features}"
                )
            fi = features.index(att)
            for c, w in stats.items():
                est = splitter._att_dist_per_class.get(c)
                if w <= 0 or est is None:
                    continue
                var = est._var
                n = var.mean.n
                if n <= var.ddof:
                    continue
                variance = var._S / (n - var.ddof)
                if variance <= 0.0:
                    continue
                ci = col[c]
                valid[li, ci, fi] = True
                mu[li, ci, fi] = var.mean._mean
                neg2var[li, ci, fi] = -2.0 * variance
                konst[li, ci, fi] = -_HALF_LOG_TAU - 0.5 * math.log(variance)

    mc_g = g.op("Gather", g.const("leaf_mc_proba", mc), leaf_ids, axis=0, hint="mc_proba")
    if not nb_flag.any():
        return mc_g
    # naive Bayes: log prior + sum over present features of Gaussian log-densities, softmax
    x0 = g.nan_to_zero(x)
    present = g.op("Not", g.op("IsNaN", x), hint="present")
    shape4 = g.const("shape_n111f", [-1, 1, 1, n_feat], np.int64)
    x4 = g.op("Reshape", x0, shape4, hint="x4")
    p4 = g.op("Reshape", present, shape4, hint="present4")

    def gather(name: str, table: np.ndarray, dtype: Any = np.float64) -> str:
        return g.op("Gather", g.const(name, table, dtype), leaf_ids, axis=0, hint=f"{name}_g")

    d = g.op("Sub", x4, gather("leaf_nb_mu", mu), hint="d")
    q = g.op(
        "Add",
        g.op("Div", g.op("Mul", d, d), gather("leaf_nb_neg2var", neg2var)),
        gather("leaf_nb_k", konst),
        hint="logpdf",
    )
    neg_inf = g.const("neg_inf", -np.inf)
    use = g.op(
        "And",
        g.op("And", gather("leaf_nb_valid", valid, np.bool_), p4),
        g.op("Greater", q, neg_inf),
        hint="use",
    )
    ll = g.reduce(
        "ReduceSum",
        g.op("Where", use, q, g.const("zero", 0.0)),
        axis=3,
        keepdims=False,
        hint="loglik",
    )
    votes = g.op("Add", gather("leaf_nb_prior", prior), ll, hint="votes")
    masked = g.op(
        "Where", gather("leaf_nb_in_leaf", in_leaf, np.bool_), votes, neg_inf, hint="votes_masked"
    )
    top = g.reduce("ReduceMax", masked, axis=2, keepdims=True, hint="votes_max")
    e = g.op("Exp", g.op("Sub", masked, top), hint="votes_exp")
    nb = g.op("Div", e, g.reduce("ReduceSum", e, axis=2, keepdims=True), hint="nb_proba")
    flag = g.op(
        "Unsqueeze",
        gather("leaf_nb_flag", nb_flag, np.bool_),
        g.const("ax2", [2], np.int64),
        hint="nb_flag",
    )
    return g.op("Where", flag, nb, mc_g, hint="tree_proba")


# -- regressor leaves --------------------------------------------------------------------------


def _leaf_linear(leaf_model: Any, features: list[str], where: str) -> tuple[np.ndarray, float]:
    if type(leaf_model) is not LinearRegression:
        raise UnsupportedModelError(
            f"{where}: model leaves are compiled for linear_model.LinearRegression only, got "
            f"{type(leaf_model).__name__}; use leaf_prediction='mean' or the default leaf_model"
        )
    if type(leaf_model.loss).mean_func is not RegressionLoss.mean_func:
        raise UnsupportedModelError(
            f"{where}: leaf LinearRegression loss {type(leaf_model.loss).__name__} has a "
            "non-identity mean function"
        )
    w = np.zeros(len(features))
    for name, value in leaf_model._weights.to_dict().items():
        if name not in features:
            if value == 0:
                continue
            raise CompileError(
                f"{where}: a leaf model weighs feature {name!r}, which is not in the feature "
                f"list {features}"
            )
        w[features.index(name)] = value
    return w, float(leaf_model.intercept)


def regressor_tree_values(
    g: GraphBuilder, x: str, trees: list[Any], features: list[str], where: str
) -> str:
    """``double[N, T]``: each tree's predict_one."""
    ts = TreeSet(features)
    for t, tree in enumerate(trees):
        ts.add_tree(tree._root, f"{where} tree {t}" if len(trees) > 1 else where)
    leaf_ids = route_to_leaves(g, x, ts)
    n_leaves = len(ts.leaves)
    mean = np.zeros(n_leaves)
    use_model = np.zeros(n_leaves, dtype=bool)
    weights = np.zeros((n_leaves, len(features)))
    intercept = np.zeros(n_leaves)
    for li, leaf in enumerate(ts.leaves):
        if not isinstance(leaf, LeafMean):
            raise UnsupportedModelError(
                f"{where}: leaf type {type(leaf).__name__} is not supported"
            )
        mean[li] = leaf.stats.mean.get()
        if isinstance(leaf, LeafAdaptive):
            model_wins = not (leaf._fmse_mean < leaf._fmse_model)
        else:
            model_wins = isinstance(leaf, LeafModel)
        if model_wins:
            use_model[li] = True
            weights[li], intercept[li] = _leaf_linear(getattr(leaf, "_leaf_model"), features, where)  # noqa: B009
    mean_g = g.op("Gather", g.const("leaf_mean", mean), leaf_ids, axis=0, hint="leaf_mean_g")
    if not use_model.any():
        return mean_g
    x0 = g.nan_to_zero(x)
    x3 = g.op("Unsqueeze", x0, g.const("ax1", [1], np.int64), hint="x3")
    w_g = g.op("Gather", g.const("leaf_w", weights), leaf_ids, axis=0, hint="leaf_w_g")
    dot = g.reduce("ReduceSum", g.op("Mul", x3, w_g), axis=2, keepdims=False, hint="leaf_dot")
    b_g = g.op("Gather", g.const("leaf_b", intercept), leaf_ids, axis=0, hint="leaf_b_g")
    lin = g.op("Add", dot, b_g, hint="leaf_linear")
    flag = g.op(
        "Gather",
        g.const("leaf_use_model", use_model, np.bool_),
        leaf_ids,
        axis=0,
        hint="leaf_use_model_g",
    )
    return g.op("Where", flag, lin, mean_g, hint="tree_value")

"""The one registry of methods: name → kind, parameter dataclass, class, and how it is drawn.

A method is either a **reducer** (tokens → codes by a fitted map: ``reducers.py``; raw DINO is the
identity) or a **head** trained from the cache (``heads/``). Everything that lists methods reads
this registry: the study graph, ``reduce``, ``probe``, the commands' help, ``status`` and the
figures. Adding a method is one module plus one :func:`register` call.

The parameter dataclass is the method's preset section: ``reduce.<name>`` for reducers,
``<name>`` for heads (which also take ``dim``, their headline D, and ``per_dim`` overrides).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from functools import cached_property
from importlib import import_module

REDUCER, HEAD = "reducer", "head"


def _resolve(ref: type | str) -> type:
    """A class, or ``"module:Name"`` imported on first use (so listing methods imports no torch)."""
    if isinstance(ref, type):
        return ref
    module, _, name = ref.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Method:
    """One registered method.

    Parameters
    ----------
    name : how presets, the CLI and artefacts call it.
    kind : ``reducer`` or ``head``.
    params_ref : its frozen parameter dataclass (its preset section), or ``"module:Name"``.
    cls_ref : a :class:`~stegoscope.reducers.Reducer` (reducer) or
        :class:`~stegoscope.heads.base.HeadTrainer` (head) subclass, or ``"module:Name"``.
    title : its name in figures and tables.
    marker : its matplotlib marker.
    table2 : a row of Table 2, evaluated with the dense CRF at its headline D.
    help : one line for the commands' help.
    paper : one of the paper's methods; the successors of STEGO are drawn beside the paper's
        Fig. 4 methods in the "beyond STEGO" figure.
    against : drawn in a figure of its own against this method (the paper's supplementary
        Fig. 2: h-NNE against PCA) instead of in Fig. 4.
    hierarchy : its fit holds a hierarchy of partitions that ``future.hierarchy`` evaluates as the
        clusterer (h-NNE's FINCH levels; ``stages/hierarchy.py``).
    raw : the backbone's tokens as they are (the identity reducer): what ``future.extra_clusters``
        probes and what ``probe --reducer identity`` means.
    defaults : ``(key, value)`` pairs this registration sets in its parameter class, under a
        preset's own values: a variant of another method (STEGO+PriMaPs-EM is PriMaPs-EM with
        ``base`` set to the STEGO head).

    The classes are imported, and checked, when first used (:attr:`params`, :attr:`cls`): the
    registry's names, titles and help cost no import of torch.
    """

    name: str
    kind: str
    params_ref: type | str
    cls_ref: type | str
    title: str
    marker: str = "o"
    table2: bool = False
    help: str = ""
    paper: bool = True
    against: str | None = None
    hierarchy: bool = False
    raw: bool = False
    defaults: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.kind not in (REDUCER, HEAD):
            raise ValueError(f"method {self.name!r}: kind must be {REDUCER!r} or {HEAD!r}, not {self.kind!r}")

    @cached_property
    def _classes(self) -> tuple[type, type]:
        from .heads.base import HeadTrainer
        from .reducers import Reducer

        params, cls = _resolve(self.params_ref), _resolve(self.cls_ref)
        base = {REDUCER: Reducer, HEAD: HeadTrainer}[self.kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"method {self.name!r}: a {self.kind} needs a {base.__name__} subclass, not {cls!r}")
        if not is_dataclass(params):
            raise TypeError(f"method {self.name!r}: params must be a dataclass, not {params!r}")
        if self.kind == HEAD and not issubclass(params, cls.params_class):
            raise TypeError(f"method {self.name!r}: params must extend {cls.params_class.__name__}")
        return params, cls

    @property
    def params(self) -> type:
        return self._classes[0]

    @property
    def cls(self) -> type:
        return self._classes[1]

    @property
    def field_names(self) -> set[str]:
        return {f.name for f in fields(self.params)}

    def with_defaults(self, values: dict) -> dict:
        """A preset section's ``values`` over this registration's :attr:`defaults`."""
        return {**dict(self.defaults), **values}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (replacing one of the same name)."""
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}") from None


def names(kind: str | None = None) -> list[str]:
    return [m.name for m in METHODS.values() if kind is None or m.kind == kind]


def in_fig4(kind: str | None = None) -> list[str]:
    """The paper's methods its Fig. 4 draws (those with a figure of their own are left out)."""
    return [m.name for m in METHODS.values() if m.paper and m.against is None and kind in (None, m.kind)]


def fig4_fits() -> list[str]:
    """The fitted reducers of Fig. 4 (PCA, RP): the codes ``future.clusterers`` compares clusterers on."""
    return [name for name in in_fig4(REDUCER) if not METHODS[name].raw]


def hierarchy_method() -> str:
    """The reducer whose fit's own hierarchy ``future.hierarchy`` evaluates."""
    return next(m.name for m in METHODS.values() if m.hierarchy)


def raw_method() -> str:
    """The reducer that keeps the backbone's tokens as they are."""
    return next(m.name for m in METHODS.values() if m.raw)


def describe(kind: str | None = None) -> str:
    """``name (help); …`` for the commands' help."""
    return "; ".join(f"{m.name}: {m.help}" if m.help else m.name for m in METHODS.values() if kind is None or m.kind == kind)


R, H = "stegoscope.reducers:", "stegoscope.heads."
register(Method("dino", REDUCER, R + "IdentityParams", R + "IdentityReducer", "DINO", "*", table2=True, raw=True,
                help="raw DINO tokens"))
register(Method("pca", REDUCER, R + "PCAParams", R + "PCA", "PCA", "s", help="exact streamed PCA, one fit for every D"))
register(Method("rp", REDUCER, R + "RPParams", R + "RandomProjection", "RP", "^", help="seeded random projection"))
register(Method("hnne", REDUCER, R + "HNNEParams", R + "HNNE", "h-NNE", "D", help="h-NNE (v1), stores projected once",
                against="pca", hierarchy=True))
register(Method("stego", HEAD, H + "stego:StegoParams", H + "stego:StegoTrainer", "STEGO", "o", table2=True,
                help="STEGO head trained from the cache"))
register(Method("smooseg", HEAD, H + "smooseg:SmooSegParams", H + "smooseg:SmooSegTrainer", "SmooSeg", "P", table2=True, paper=False,
                help="SmooSeg (projector, EMA teacher prototypes, smoothness loss) from the cache"))
register(Method("hp", HEAD, H + "hp:HPParams", H + "hp:HPTrainer", "HP", "h", table2=True, paper=False,
                help="HP (hidden positives, attention-weighted local positives) from the cache"))
register(Method("primaps", HEAD, H + "primaps:PrimapsParams", H + "primaps:PrimapsTrainer", "PriMaPs-EM", "X", table2=True,
                paper=False, help="PriMaPs-EM (mask proposals, EM with an EMA teacher) on raw DINO tokens, from the cache"))
register(Method("stego-primaps", HEAD, H + "primaps:PrimapsParams", H + "primaps:PrimapsTrainer", "STEGO+PriMaPs-EM", "x",
                table2=True, paper=False, help="PriMaPs-EM on a trained STEGO head's codes", defaults=(("base", "stego"),)))
register(Method("cause-mlp", HEAD, H + "cause:CauseParams", H + "cause:CauseTrainer", "CAUSE-MLP", "p", table2=True, paper=False,
                help="CAUSE with its MLP head (clusterbook, concept-wise InfoNCE, EMA teacher) from the cache",
                defaults=(("variant", "mlp"),)))
register(Method("cause-tr", HEAD, H + "cause:CauseParams", H + "cause:CauseTrainer", "CAUSE-TR", "<", table2=True, paper=False,
                help="CAUSE with its transformer-decoder head, on its own train split's grid, from the cache",
                defaults=(("variant", "tr"),)))

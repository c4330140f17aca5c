"""User components: Hydra `_target_` nodes (a callable's import path and its keyword arguments).

The model, datasets, optimizer, LR schedule and task are such nodes, built with `hydra.utils.instantiate` on
every rank. `check` refuses a node that cannot be built (a target that does not exist, a keyword the
callable does not take, a required one missing) with the key, the reason and the fix, before anything is
submitted. It reads the target's source instead of importing it when it can: a login node then checks a
config naming torch or the user's model without spending seconds importing them. Only a target whose
signature the source does not show plainly (compiled, generated, inherited), or one that seems to fail,
is imported, so that a refusal is always the callable's real answer.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcml.errors import ConfigError

TARGET = "_target_"
# Hydra's own keys in a node; never passed to the callable as keywords.
HYDRA_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})


@dataclass(frozen=True)
class Signature:
    """What a callable accepts, from its source or from inspect."""

    keywords: tuple[str, ...]  # parameters that can be given by name
    positional: tuple[str, ...]  # parameters that can be given by position, in order
    required: tuple[str, ...]  # parameters without a default
    var_keyword: bool  # **kwargs: any name goes

    def problems(self, given: set[str], supplied: int, partial: bool) -> list[str]:
        """What is wrong with calling it with `supplied` positional arguments and the keywords `given`."""
        by_position = set(self.positional[:supplied])
        found = []
        unknown = sorted(given - set(self.keywords)) if not self.var_keyword else []
        for name in unknown:
            close = difflib.get_close_matches(name, self.keywords, n=1)
            found.append(f"it takes no argument {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        taken_twice = sorted(given & by_position)
        if taken_twice:
            found.append(f"{', '.join(map(repr, taken_twice))} is passed by hpcml itself; remove it from the config")
        missing = [p for p in self.required if p not in given and p not in by_position]
        if missing and not partial:
            found.append(f"it needs {', '.join(map(repr, missing))}, which the config does not give")
        return found


def check(key: str, node: Any, supplied: int = 0, signature: bool = True) -> None:
    """Refuse a `_target_` node at `key` that cannot be built; `supplied` positional arguments come from hpcml
    (an optimizer's parameters, a schedule's optimizer). Nested `_target_` nodes are checked too. With
    `signature` false (launch.check_components=false), only that it is a `_target_` node."""
    if not isinstance(node, Mapping) or not isinstance(node.get(TARGET), str) or not node[TARGET]:
        raise ConfigError(
            f"{key} must be a node with a _target_ (the import path of a class or function) and its keyword "
            f"arguments, e.g. {key}._target_=my_project.models.Net; got {node!r}."
        )
    # With _recursive_: false the callable builds its nested nodes itself, perhaps with arguments of its own.
    if node.get("_recursive_", True):
        for name, value in node.items():
            if isinstance(value, Mapping) and TARGET in value:
                check(f"{key}.{name}", value, signature=signature)
    if not signature:
        return
    target = node[TARGET]
    given = {str(k) for k in node if k not in HYDRA_KEYS}
    supplied += len(node.get("_args_") or ())
    partial = bool(node.get("_partial_", False))
    signature = _signature_from_source(target)
    if signature is not None and not signature.problems(given, supplied, partial):
        return
    # Not readable from the source, or the source says no: ask the real callable.
    problems = _signature_from_import(key, target).problems(given, supplied, partial)
    if problems:
        raise ConfigError(
            f"{key}._target_={target}: {'; '.join(problems)}. Fix the arguments under {key} (see the signature of "
            f"{target}), or name another callable."
        )


def build(key: str, node: Mapping[str, Any], *args: Any) -> Any:
    """`hydra.utils.instantiate(node, *args)`, with a failure named by its config key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, *args, _convert_="all")
    except InstantiationException as err:
        # Hydra's message repeats the target; the cause is what the callable itself said.
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ConfigError(
            f"{key}: could not build {node.get(TARGET)}: {cause!r}. Fix the arguments under {key}."
        ) from err


# ------------------------------------------------------------ reading signatures


def _signature_from_import(key: str, target: str) -> Signature:
    module_name, _, attr = target.rpartition(".")
    obj = None
    while module_name:
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as err:
            if err.name is None or not (module_name == err.name or module_name.startswith(f"{err.name}.")):
                raise ConfigError(f"{key}._target_={target}: importing it failed: {err!r}. Fix that module.") from err
            # `module.Class.method`: one more part belongs to the attribute path.
            module_name, _, outer = module_name.rpartition(".")
            attr = f"{outer}.{attr}"
        except Exception as err:  # the user's module itself raised while importing
            raise ConfigError(
                f"{key}._target_={target}: importing {module_name} failed: {err!r}. Fix that module."
            ) from err
    if obj is None:
        raise ConfigError(
            f"{key}._target_={target}: no such module. Give a full import path (package.module.Name) that the "
            "login and compute nodes can import: install the project, or put its directory on PYTHONPATH."
        )
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}._target_={target}: {obj.__name__} has no attribute {part!r}. Fix the name.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}._target_={target} is not callable; name a class or a function.")
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: accept anything
        return Signature((), (), (), var_keyword=True)
    kinds = inspect.Parameter
    return Signature(
        keywords=tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)),
        positional=tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)),
        required=tuple(
            p.name for p in params if p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        ),
        var_keyword=any(p.kind is kinds.VAR_KEYWORD for p in params),
    )


@functools.lru_cache(maxsize=256)
def _signature_from_source(target: str) -> Signature | None:
    """The signature of a top-level function or of a class's own `__init__`, read from the module's source
    (following `from x import name` re-exports); None when the source does not show it plainly."""
    module_name, _, name = target.rpartition(".")
    if not module_name:
        return None
    definition = _find_definition(module_name, name, depth=0)
    if isinstance(definition, ast.ClassDef):
        inits = [n for n in definition.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
        # No __init__ of its own (inherited, a dataclass): only the real class knows.
        if len(inits) != 1 or definition.decorator_list:
            return None
        return _from_arguments(inits[0].args, skip_first=True)
    if isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)) and not definition.decorator_list:
        return _from_arguments(definition.args, skip_first=False)
    return None


def _from_arguments(args: ast.arguments, skip_first: bool) -> Signature:
    positional = [a.arg for a in [*args.posonlyargs, *args.args]]
    defaults_from = len(positional) - len(args.defaults)
    required = [name for i, name in enumerate(positional) if i < defaults_from]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    if skip_first and positional:
        dropped = positional.pop(0)
        required = [r for r in required if r != dropped]
    posonly = {a.arg for a in args.posonlyargs}
    return Signature(
        keywords=tuple([p for p in positional if p not in posonly] + [a.arg for a in args.kwonlyargs]),
        positional=tuple(positional),
        required=tuple(required),
        var_keyword=args.kwarg is not None,
    )


def _module_source(module_name: str) -> Path | None:
    """The .py file of a module, found without importing it or its packages (find_spec of a submodule
    would import its parents: for torch.optim, all of torch)."""
    top, *rest = module_name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        package = next((f / part for f in folders if (f / part / "__init__.py").is_file()), None)
        if package is not None:
            if last:
                return package / "__init__.py"
            folders = [package]
            continue
        module = next((f / f"{part}.py" for f in folders if (f / f"{part}.py").is_file()), None)
        return module if last else None
    return None


def _find_definition(module_name: str, name: str, depth: int) -> ast.AST | None:
    path = _module_source(module_name)
    if path is None or depth > 4:
        return None
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    is_package = path.name == "__init__.py"
    star_modules = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and name in _assigned_names(node):
            return None  # bound by an expression: only the real module knows
        if isinstance(node, ast.ImportFrom):
            source = _absolute(module_name, node, is_package)
            for alias in node.names:
                if alias.name == "*":
                    star_modules.append(source)
                elif (alias.asname or alias.name) == name:
                    return _find_definition(source, alias.name, depth + 1)
    for source in star_modules:
        found = _find_definition(source, name, depth + 1)
        if found is not None:
            return found
    return None


def _assigned_names(node: ast.Assign | ast.AnnAssign) -> set[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _absolute(module_name: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module_name.split(".")
    # In a package's __init__, `.` is the package itself; in a module, its parent.
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)

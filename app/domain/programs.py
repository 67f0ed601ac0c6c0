"""The program contract and its static checks: what an artifact's source may contain and how it is compiled."""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

# A program is Python source defining `run(input: dict) -> object`; the return value must be JSON-serialisable.
# It may import only ALLOWED_MODULES and sees a reduced set of builtins. These checks are the inner layer of
# the sandbox; the outer layer (a separate process with OS limits, see app/sandbox) is what contains a program
# that gets past them.

if TYPE_CHECKING:
    from app.contract.records import ComplexityMetrics

ALLOWED_MODULES = frozenset(
    {
        "bisect", "cmath", "collections", "datetime", "decimal", "difflib", "fractions", "hashlib",
        "heapq", "itertools", "json", "math", "random", "re", "statistics", "textwrap", "unicodedata",
        "base64", "functools",
    }
)
# Public names that still lead somewhere a program must not go: eval of annotation strings (singledispatch),
# copying attributes named by strings (update_wrapper and wraps take `assigned=("__globals__",)`).
_WITHHELD_MODULE_NAMES = {"functools": {"singledispatch", "singledispatchmethod", "update_wrapper", "wraps"}}
_WITHHELD_NAMES = frozenset().union(*_WITHHELD_MODULE_NAMES.values())

# Attributes that reach frames, code objects or globals without a leading underscore.
_FORBIDDEN_ATTRIBUTES = frozenset(
    {
        "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
        "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "tb_frame", "tb_next", "co_code",
        "func_globals", "mro",
        # str.format and format_map walk attributes and items named inside the format string, at run time
        "format", "format_map",
    }
)
_FORBIDDEN_NAMES = frozenset(
    {
        "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals", "vars",
        "breakpoint", "help", "memoryview", "exit", "quit", "dir", "hasattr",
    }
)
# Special methods a program may define: the ones that make its own values behave like numbers, containers,
# strings or context managers. Not hooks that change how other code looks up attributes, matches patterns,
# checks types, builds classes or finalises objects (__getattr__, __match_args__, __instancecheck__,
# __init_subclass__, __set_name__, __del__, __reduce__…).
_ALLOWED_DUNDER_DEFS = frozenset(
    "__init__ __repr__ __str__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__ __bool__ __len__ __iter__ "
    "__next__ __contains__ __getitem__ __setitem__ __delitem__ __add__ __sub__ __mul__ __truediv__ "
    "__floordiv__ __mod__ __pow__ __neg__ __pos__ __abs__ __radd__ __rsub__ __rmul__ __and__ __or__ "
    "__xor__ __enter__ __exit__ __call__ __int__ __float__ __index__ __round__".split()
)
_DUNDER = re.compile(r"^__\w+__$")

_SAFE_BUILTIN_NAMES = (
    "abs all any ascii bin bool bytearray bytes callable chr classmethod complex dict divmod enumerate "
    "filter float format frozenset hash hex id int isinstance issubclass iter len list map max min "
    "next object oct ord pow property range repr reversed round set slice sorted staticmethod str sum super tuple "
    "type zip True False None NotImplemented Ellipsis __build_class__"
).split()


class ProgramRejected(ValueError):
    """Source that breaks the program contract; the message lists every problem with its line."""


def check_source(source: str) -> ast.Module:
    """Parse and statically check a program. Returns the tree, or raises ProgramRejected."""
    try:
        tree = ast.parse(source, filename="<program>")
    except SyntaxError as exc:
        raise ProgramRejected(f"syntax error at line {exc.lineno}: {exc.msg}") from exc
    problems: list[str] = []

    def problem(node: ast.AST, text: str) -> None:
        problems.append(f"line {getattr(node, 'lineno', '?')}: {text}")

    for node in ast.walk(tree):
        for text in _check_node(node):
            problem(node, text)
    if not any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body):
        problems.append("no top-level function `run(input)` is defined")
    if problems:
        raise ProgramRejected("; ".join(problems))
    return tree


def _check_node(node: ast.AST) -> Iterator[str]:
    """The problems of one syntax node. Names that reach an attribute are checked wherever the language lets
    a program write them: attribute access, class patterns of `match`, and imported names."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name not in ALLOWED_MODULES:
                yield f"import of {alias.name!r} is not allowed"
    elif isinstance(node, ast.ImportFrom):
        if node.level or node.module not in ALLOWED_MODULES:
            yield f"import from {node.module!r} is not allowed"
        for alias in node.names:
            if alias.name == "*":
                yield "star imports are not allowed"
            elif alias.name.startswith("_") or alias.name in _WITHHELD_MODULE_NAMES.get(node.module or "", ()):
                yield f"import of {node.module}.{alias.name} is not allowed"
    elif isinstance(node, ast.Attribute):
        if _is_forbidden_attribute(node.attr):
            yield f"attribute {node.attr!r} is not allowed"
    elif isinstance(node, ast.MatchClass):  # `case C(attr=...)` reads attribute `attr` of the subject
        for name in node.kwd_attrs:
            if _is_forbidden_attribute(name):
                yield f"attribute {name!r} in a class pattern is not allowed"
        if node.patterns:
            # C(x) reads the attributes that C.__match_args__ names: data the check cannot see (and a name like
            # `int` can be rebound to any class)
            yield "positional sub-patterns in class patterns are not allowed (use `case int() as x` or keywords)"
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        if node.name.startswith("__") and node.name not in _ALLOWED_DUNDER_DEFS:
            yield f"defining {node.name!r} is not allowed"
        if isinstance(node, ast.ClassDef) and node.keywords:
            yield "class keywords (metaclass=…) are not allowed"
    elif isinstance(node, ast.keyword) and node.arg is not None and node.arg.startswith("_"):
        yield f"keyword argument {node.arg!r} is not allowed"
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DUNDER.match(node.value):
        yield f"the string {node.value!r} names a special attribute and is not allowed"
    elif isinstance(node, ast.Name):
        if node.id.startswith("__") or node.id in _FORBIDDEN_NAMES:
            yield f"name {node.id!r} is not available to programs"
    elif isinstance(node, ast.alias) and node.asname and node.asname.startswith("__"):
        yield f"name {node.asname!r} is not allowed"
    elif isinstance(node, ast.Global | ast.Nonlocal):
        for name in node.names:
            if name.startswith("__"):
                yield f"name {name!r} is not allowed"
    elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name and node.name.startswith("__"):
        yield f"name {node.name!r} is not allowed"
    elif isinstance(node, ast.MatchMapping) and node.rest and node.rest.startswith("__"):
        yield f"name {node.rest!r} is not allowed"


def _is_forbidden_attribute(name: str) -> bool:
    return name.startswith("_") or name in _FORBIDDEN_ATTRIBUTES or name in _WITHHELD_NAMES


def complexity_of(source: str) -> ComplexityMetrics:
    """Lines of code and cyclomatic complexity (1 + decision points) of a program."""
    from app.contract.records import ComplexityMetrics  # here, not above: sandbox processes import this module bare

    tree = ast.parse(source)
    decisions = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.For | ast.While | ast.IfExp | ast.ExceptHandler | ast.match_case):
            decisions += 1
        elif isinstance(node, ast.BoolOp):
            decisions += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            decisions += 1 + len(node.ifs)
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return ComplexityMetrics(lines_of_code=len(lines), cyclomatic_complexity=1 + decisions)


class _ReadOnlyModule(types.SimpleNamespace):
    """What a program gets for `import json`: read-only, so that a program cannot change the modules that the
    sandbox's own loop uses (json.dumps = ...)."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"module attributes are read-only for programs (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"module attributes are read-only for programs (tried to delete {name!r})")


def _public_namespace(name: str) -> _ReadOnlyModule:
    """A module's public, non-module attributes: `re.enum`, `random.os` and the like are left out."""
    module = importlib.import_module(name)
    withheld = _WITHHELD_MODULE_NAMES.get(name, set())
    return _ReadOnlyModule(
        **{
            key: value
            for key, value in vars(module).items()
            if not key.startswith("_") and not isinstance(value, types.ModuleType) and key not in withheld
        }
    )


def _type_of(value: Any) -> type:
    """`type(x)` for programs: the one-argument form, and not of a class. Three arguments would build a class
    with any special method named by strings the static check cannot see; the type of a class is a metaclass,
    which does the same."""
    if isinstance(value, type):
        raise TypeError("type() of a class is not available to programs")
    return type(value)


class ProgramCompiler:
    """Compiles checked programs against the restricted builtins. Build it once per sandbox process:
    it imports every allowed module up front, so programs never make the process open files."""

    def __init__(self) -> None:
        self._modules = {name: _public_namespace(name) for name in ALLOWED_MODULES}
        safe: dict[str, Any] = {name: getattr(builtins, name) for name in _SAFE_BUILTIN_NAMES}
        safe.update(
            {
                name: value
                for name, value in vars(builtins).items()
                if isinstance(value, type) and issubclass(value, BaseException)
            }
        )
        safe["print"] = lambda *args, **kwargs: None
        safe["type"] = _type_of
        safe["__import__"] = self._import
        self._builtins = safe

    def _import(self, name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level or name not in self._modules:
            raise ImportError(f"import of {name!r} is not allowed")
        return self._modules[name]

    def compile(self, source: str) -> Callable[[dict[str, Any]], Any]:
        """Check, compile and load a program; returns its `run` function. Raises ProgramRejected."""
        tree = check_source(source)
        code = compile(tree, "<program>", "exec")
        namespace: dict[str, Any] = {"__builtins__": self._builtins, "__name__": "program"}
        try:
            exec(code, namespace)
        except Exception as exc:
            raise ProgramRejected(f"program failed while loading: {type(exc).__name__}: {exc}") from exc
        run = namespace.get("run")
        if not callable(run):
            raise ProgramRejected("`run` is not a function")
        return run  # type: ignore[no-any-return]

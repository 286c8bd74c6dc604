"""MkDocs hooks for the docs site (``mkdocs.yml``: ``hooks``).

1. The pages are also read on GitHub, where a link like ``../examples/gan_alternating.py`` or
   ``../benchmarks/results/results.md`` points at a file of the repository. MkDocs only knows
   files under ``docs/``, and ``--strict`` rejects such links. Every repository file a page links
   to (and, for a linked Markdown file, what it links to in turn) is added to the site under
   ``repo/<its path>``, and the link is rewritten to it. A link to a file that does not exist is
   left alone, so ``--strict`` still fails on it.
2. Docstrings use Sphinx roles (``:meth:`freeze```); the role prefix is dropped from the HTML.
3. A page includes a repository file with a line ``<!-- include: examples/x.py -->``, which a
   code host hides (the page links the file next to it) and the site replaces with the file: a
   code block for source, the text itself for Markdown (through ``pymdownx.snippets``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?((?:\s+\"[^\"]*\")?\))")
ROLE = re.compile(r":(?:meth|class|func|attr|mod|data|obj):(?=<code)")
PREFIX = "repo"
INCLUDE = re.compile(r"^<!-- include: (\S+) -->$", re.MULTILINE)
LANGUAGES = {".py": "python", ".json": "json", ".toml": "toml", ".txt": "text"}


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _repo_path(config: Any, src_uri: str) -> str:
    """Where a site file lives in the repository, as a POSIX path from the root."""
    if src_uri.startswith(PREFIX + "/"):
        return src_uri[len(PREFIX) + 1 :]
    docs = Path(config["docs_dir"]).resolve().relative_to(_root(config)).as_posix()
    return posixpath.join(docs, src_uri)


def _site_uri(config: Any, repo_path: str) -> str:
    docs = Path(config["docs_dir"]).resolve().relative_to(_root(config)).as_posix()
    if repo_path.startswith(docs + "/"):
        return repo_path[len(docs) + 1 :]
    return posixpath.join(PREFIX, repo_path)


def _targets(config: Any, src_uri: str, text: str) -> list[tuple[str, str]]:
    """(link as written, repository path) for each relative link to an existing repository file."""
    root = _root(config)
    here = posixpath.dirname(_repo_path(config, src_uri))
    out = []
    for match in LINK.finditer(text):
        link = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE) or link.startswith("/"):
            continue
        target = posixpath.normpath(posixpath.join(here, link))
        if not target.startswith("../") and (root / target).is_file():
            out.append((link, target))
    return out


def on_files(files: Files, config: Any) -> Files:
    root = _root(config)
    queue = [f for f in files if f.src_uri.endswith(".md")]
    while queue:
        page = queue.pop()
        text = Path(page.abs_src_path).read_text(encoding="utf-8") if page.abs_src_path else ""
        for _, target in _targets(config, page.src_uri, text):
            uri = _site_uri(config, target)
            if files.get_file_from_path(uri) is None:
                added = File.generated(config, uri, abs_src_path=str(root / target))
                files.append(added)
                if uri.endswith(".md"):
                    queue.append(added)
    return files


def _include(match: re.Match[str]) -> str:
    path = match.group(1)
    snippet = f'--8<-- "{path}"'
    if path.endswith(".md"):
        return snippet
    return f"```{LANGUAGES.get(posixpath.splitext(path)[1], '')}\n{snippet}\n```"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    markdown = INCLUDE.sub(_include, markdown)
    here = posixpath.dirname(page.file.src_uri)
    rewrites = {
        link: posixpath.relpath(_site_uri(config, target), here or ".")
        for link, target in _targets(config, page.file.src_uri, markdown)
    }
    if not rewrites:
        return markdown
    return LINK.sub(
        lambda m: m.group(1) + rewrites.get(m.group(2), m.group(2)) + (m.group(3) or "") + m.group(4),
        markdown,
    )


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub("", html)

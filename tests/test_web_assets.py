"""The dashboard's files, read as files: what the CSP and the escaping rules rely on.

The browser tests (test_browser.py) show the pages work; these show, without a
browser, that no page carries inline script or style (which the
Content-Security-Policy would block, and which would be an injection point),
that no script writes HTML text, and that the colours keep WCAG AA contrast.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from relay.web.pages import CONTENT_SECURITY_POLICY, WEB

PAGES = sorted(WEB.glob("*.html"))
SCRIPTS = sorted((WEB / "static" / "js").glob("*.js"))


class Inline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("inline <script>")
        if tag == "style":
            self.found.append("<style> element")
        self.found += [f"{tag} {name}=" for name in names if name.startswith("on") or name == "style"]
        for name, value in attrs:
            if name in ("href", "src", "action") and value and re.match(r"\s*(javascript|https?):", value):
                self.found.append(f"{tag} {name}={value} (inline or third-party)")


def test_there_are_pages_and_scripts():
    assert {p.name for p in PAGES} == {"index.html", "register.html", "instance.html"}
    assert {"common.js", "directory.js", "register.js", "instance.js", "markdown.js", "sse.js"} <= {
        s.name for s in SCRIPTS}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_have_no_inline_script_style_or_third_party_url(page: Path):
    parser = Inline()
    parser.feed(page.read_text())
    assert parser.found == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_never_write_html_text(script: Path):
    # Code only: the comments may name what the code avoids.
    source = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout('", 'setTimeout("'):
        assert sink not in source, f"{script.name} uses {sink}"
    # Only our own origin: every fetch/EventSource URL is a path.
    for url in re.findall(r"(?:fetch|EventSource)\(\s*[`'\"]([^`'\"]*)", source):
        assert url.startswith("/"), f"{script.name} calls {url}"


def test_csp_allows_nothing_from_elsewhere():
    directives = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def _luminance(colour: str) -> float:
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def schemes() -> dict[str, dict[str, str]]:
    css = (WEB / "static" / "app.css").read_text()
    light_part, dark_part = css.split("@media (prefers-color-scheme: dark)", 1)
    variable = r"--([\w-]+):\s*(#[0-9a-fA-F]{6})"
    light = dict(re.findall(variable, light_part))
    dark = {**light, **dict(re.findall(variable, dark_part.split("\n}\n", 1)[0]))}
    return {"light": light, "dark": dark}


#: (text, background) pairs the stylesheet puts together.
PAIRS = [
    ("text", "bg"), ("text", "panel"), ("text", "code-bg"), ("text", "warn-bg"),
    ("muted", "bg"), ("muted", "panel"), ("muted", "code-bg"), ("muted", "offline-bg"),
    ("accent", "bg"), ("accent", "panel"), ("accent-text", "accent"),
    ("online", "online-bg"), ("online", "panel"), ("offline", "offline-bg"),
    ("danger", "danger-bg"), ("danger-text", "danger"),
]


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize(("fg", "bg"), PAIRS)
def test_text_contrast_meets_wcag_aa(scheme: str, fg: str, bg: str):
    colours = schemes()[scheme]
    assert contrast(colours[fg], colours[bg]) >= 4.5, f"{scheme}: {fg} on {bg}"

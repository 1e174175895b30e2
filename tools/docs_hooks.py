"""mkdocs hook: the command-line reference is rendered from the typer app at build time.

docs/cli.md holds the marker ``<!-- pes-cli-reference -->``; this hook replaces it with the
``--help`` text of ``pes`` and of every command and sub-command, as click formats it, so the
page never goes stale.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- pes-cli-reference -->"


# Commands are click commands (typer may bring its own copy of click, so no click import here).
def _context(command: Any, path: list[str]) -> Any:
    return command.context_class(command, info_name=" ".join(path), terminal_width=100,
                                 max_content_width=100)


def _sections(command: Any, path: list[str], level: int) -> list[str]:
    title = "#" * level + f" `{' '.join(path)}`"
    ctx = _context(command, path)
    out = [title, "", "```text", command.get_help(ctx), "```", ""]
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                out += _sections(sub, [*path, name], min(level + 1, 4))
    return out


def cli_reference() -> str:
    """Markdown of every command's help, the root first."""
    import typer

    from pes.cli import app

    return "\n".join(_sections(typer.main.get_command(app), ["pes"], 2))


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown

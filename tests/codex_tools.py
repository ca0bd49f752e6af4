"""What Codex CLI sends as tools, for the tests of the Responses API: its apply_patch grammar.

Copied from openai/codex (codex-rs, tool_apply_patch.lark), as its custom ``apply_patch``
tool sends it in ``format.definition``.
"""

APPLY_PATCH = (
    'start: begin_patch hunk+ end_patch\nbegin_patch: "*** Begin Patch" LF\n'
    'end_patch: "*** End Patch" LF?\n\n'
    "hunk: add_hunk | delete_hunk | update_hunk\n"
    'add_hunk: "*** Add File: " filename LF add_line+\ndelete_hunk: "*** Delete File: " filename LF\n'
    'update_hunk: "*** Update File: " filename LF change_move? change?\n\n'
    'filename: /(.+)/\nadd_line: "+" /(.*)/ LF -> line\n\n'
    'change_move: "*** Move to: " filename LF\nchange: (change_context | change_line)+ eof_line?\n'
    'change_context: ("@@" | "@@ " /(.+)/) LF\nchange_line: ("+" | "-" | " ") /(.*)/ LF\n'
    'eof_line: "*** End of File" LF\n\n%import common.LF\n'
)

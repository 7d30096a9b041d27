"""A chat template as Jinja source: the `chat_template` of a Hugging Face tokenizer, so that `apply_chat_template`
renders a conversation to the same text as `render` (which tokenises that text piece by piece).

A template that carries its own Jinja source (`jinja_source`, e.g. one read from a tokenizer) is returned as it is;
a built-in one is generated from its data: the BOS string, then per message the role's prefix, the content and the
role's suffix, then the assistant prefix when `add_generation_prompt` is set. Any other role raises.
"""

from __future__ import annotations

import json
from typing import Any

from polytrain.data.chat import ROLES


def _literal(text: str) -> str:
    """A Jinja string literal of `text` (JSON's escapes are Jinja's)."""
    return json.dumps(text, ensure_ascii=False)


def jinja_source(template: Any) -> str:
    """The Jinja chat template equivalent to `template` (its own `jinja_source` where it has one)."""
    own = getattr(template, "jinja_source", None)
    if own:
        return own
    out = [f"{{{{ {_literal(template.bos)} }}}}"] if template.bos else []
    out.append("{% for message in messages %}")
    for i, role in enumerate(ROLES):
        keyword = "if" if i == 0 else "elif"
        text = " + ".join(part for part in (_literal(template.prefix[role]) if template.prefix[role] else "",
                                            "message['content']",
                                            _literal(template.suffix[role]) if template.suffix[role] else "") if part)
        out.append(f"{{% {keyword} message['role'] == {_literal(role)} %}}{{{{ {text} }}}}")
    roles = ", ".join(ROLES)
    out.append(f"{{% else %}}{{{{ raise_exception('unsupported role ' + message['role'] + ' (roles: {roles})') }}}}"
               "{% endif %}{% endfor %}")
    if template.prefix["assistant"]:
        out.append(f"{{% if add_generation_prompt %}}{{{{ {_literal(template.prefix['assistant'])} }}}}{{% endif %}}")
    return "".join(out)

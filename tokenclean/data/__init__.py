"""Records -> tokenized examples with a response (target) mask.

The data flow, one module per step, kept apart on purpose:

* read (`records`): `read_conversations` (and `read_records`, the same as a list of dicts) streams a data file into
  compact `Conversations`, without importing torch or transformers, so a bad file fails in seconds, before any model
  loads;
* validate (`validate`): every record is checked and normalised to ``{"messages": [{"role", "content"}, ...]}``
  as it is read;
* render (`templates`): each conversation becomes one text (the tokenizer's chat template, or the plain template)
  with the character span of every target turn;
* tokenize (`tokens`): `tokenize` turns the texts into token ids and the target mask (`Examples`).

Errors in the data are `DataError`s naming the file, the record and the fix (`errors`). The names below are the
package's interface: import them from ``tokenclean.data``.
"""
from tokenclean.data.errors import SKIP_FIX, DataError, TemplateError
from tokenclean.data.records import Conversations, read_conversations, read_records
from tokenclean.data.templates import (
    PLAIN_HEADERS,
    PLAIN_SEPARATOR,
    bos_to_add,
    render_chat,
    render_plain,
    resolve_template,
)
from tokenclean.data.tokens import Examples, split_indices, tokenize, tokenizer_fingerprint
from tokenclean.data.validate import ROLES, SHAPES

__all__ = [
    "PLAIN_HEADERS", "PLAIN_SEPARATOR", "ROLES", "SHAPES", "SKIP_FIX",
    "Conversations", "DataError", "Examples", "TemplateError",
    "bos_to_add", "read_conversations", "read_records", "render_chat", "render_plain", "resolve_template",
    "split_indices", "tokenize", "tokenizer_fingerprint",
]

"""A small corpus whose chunks end where tokenization is fragile: paragraph breaks, runs of blank lines, blank
lines holding spaces, code blocks and indented code, and non-ASCII text. CHUNK_TOKENS cuts most of its chunks at
a paragraph break."""

from __future__ import annotations

from kvblend.retrieval.corpus import Document

CHUNK_TOKENS = 64

PROSE = """The lighthouse keeper kept a log of every ship that passed the headland. Each entry held the hour, the \
flag and the direction of the wind, written in a careful hand. On calm days he added a line about the colour of the sea and the birds on the rocks.

In winter the entries grew short. Storms closed the harbour for days, and the keeper wrote only the height of \
the waves and the state of the lamp. Supplies came by boat once a month, weather permitting, and the keeper counted every barrel of oil.

When the lamp failed one night in March, the log records that the keeper climbed the tower with a lantern and \
kept it burning until dawn, so that no ship would miss the rocks. The next morning he wrote that his hands were black with soot.



Years later the log was found in a drawer of the keeper's cottage. It is now kept in the town museum, beside \
the old brass lens of the lamp itself.
"""

CODE = """# Reading a configuration file

The loader reads a TOML file and returns a dictionary of settings:

```python
def load(path):
    with open(path, "rb") as fh:
        return tomllib.load(fh)
```

Missing keys fall back to defaults. The defaults live in one module so that every caller sees the same values.
  
An indented block works the same way:

    settings = load("app.toml")
    port = settings.get("port", 8000)

Errors in the file are reported with the line number where the parser stopped.
"""

UNICODE = """Grüße aus München! Die Straßenbahn fährt über die Brücke, und die Cafés öffnen früh am Morgen. \
Man trinkt dort Kaffee und liest die Zeitung.

東京の朝は早い。電車は時間通りに来て、人々は静かに乗り込む。

Le café du coin sert des croissants tièdes et un café très noir. On y parle de la météo, du marché et des \
nouvelles du quartier 😀🎉. Le soir, la terrasse est pleine.

Ελληνικά γράμματα: α, β, γ. Русский текст тоже здесь: привет, мир. The end of the page says ñandú and façade.
"""

LISTS = """Steps to restore a backup:

1. Stop the service.
2. Copy the archive to the data directory.
3. Unpack it with tar -xzf backup.tar.gz.
4. Start the service and watch the first requests.

Notes:
- Keep the old directory until the service starts again.
- Check the logs for errors after the first start.


The restore takes about ten minutes for a database of one gigabyte. Larger databases take longer, mostly for \
unpacking the archive and rebuilding the indexes.
"""

DOCUMENTS = [Document("prose.txt", PROSE, "prose"), Document("code.md", CODE, "code"),
             Document("unicode.txt", UNICODE, "unicode"), Document("lists.txt", LISTS, "lists")]

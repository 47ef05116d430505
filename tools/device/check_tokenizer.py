"""Before training on shards tokenized on another machine: the teacher's tokenizer here must give the same ids for
the same texts (tokcheck.json, written where the shards were prepared). Same ids but another hash (the hash reads
the tokenizer through the installed transformers) -> the manifest takes this machine's hash, said aloud; other
ids -> exit 1, the shards mean something else here. Usage: check_tokenizer.py TOKCHECK.json DATA_DIR"""
import json
import sys
from pathlib import Path

from llamba.distill.data import tokenize_documents, tokenizer_hash
from llamba.teacher import load_tokenizer

check, data = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
tok = load_tokenizer("smollm2-135m")
ids = tokenize_documents(tok, check["texts"])
if [d[:-1] for d in ids] != [d[:-1] for d in check["ids"]]:
    sys.exit("tokenizer: different ids here than where the shards were prepared; re-prepare the data on this machine")
if ids[0][-1] != check["ids"][0][-1]:  # the shards keep their own EOS: the manifest names it, the trainer reads it
    print(f"tokenizer: same text ids, but EOS {ids[0][-1]} here vs {check['ids'][0][-1]} in the shards "
          "(transformers / tokenizers versions read the GGUF's EOS differently)")
here = tokenizer_hash(tok)
manifest = json.loads((data / "manifest.json").read_text())
if manifest["tokenizer"]["hash"] != here:
    print(f"tokenizer: same ids, hash {here} here vs {manifest['tokenizer']['hash']}: manifest rewritten")
    manifest["tokenizer"]["hash"] = here
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))
else:
    print(f"tokenizer: same ids and hash ({here})")

"""Print the header and statistics of a token file, and decode one document.

Example:
    python data_tools/inspect_data.py --input_prefix data/shakespeare_gpt2 \\
        --tokenizer_name_or_path tests/assets/tokenizers/gpt2 --document 0
"""

import argparse
import json
import os

import numpy as np

import _common  # noqa: F401 - puts the repository root on sys.path

from _common import run_tool


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_prefix", required=True, help="token-file prefix (PREFIX.bin/.idx or PREFIX_ids.npy/_idx.npz)")
    parser.add_argument("--tokenizer_name_or_path", help="tokenizer used to decode --document")
    parser.add_argument("--document", type=int, help="index of the document to print (ids, and text with a tokenizer)")
    parser.add_argument("--max_chars", type=int, default=2000, help="longest decoded text printed, in characters")
    return parser.parse_args()


def main() -> None:
    from fleetlm.data.errors import DataError
    from fleetlm.data.indexed_dataset import (
        idx_path,
        metadata_path,
        open_token_documents,
        read_index_header,
        read_token_metadata,
    )

    args = parse_args()
    documents = open_token_documents(args.input_prefix)
    lengths = np.asarray(documents.doc_length)
    if os.path.isfile(idx_path(args.input_prefix)):
        _, _, document_index_length = read_index_header(idx_path(args.input_prefix))
        layout = f"MMIDIDX version 1, document index length {document_index_length}"
    else:
        layout = "PaddleNLP _ids.npy/_idx.npz pair"
    print(f"prefix:     {args.input_prefix}")
    print(f"format:     {layout}")
    print(f"dtype:      {documents.dtype}")
    print(f"sequences:  {len(documents.sizes)}")
    print(f"documents:  {documents.num_documents}")
    print(f"tokens:     {documents.num_tokens}")
    if documents.num_documents:
        print(f"doc length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}")
    if documents.num_tokens:
        print(f"token ids:  min {documents.tokens.min()}, max {documents.tokens.max()}")
    metadata = read_token_metadata(args.input_prefix)
    if metadata is None:
        print(f"metadata:   none ({metadata_path(args.input_prefix)} does not exist; PaddleNLP writes no such file)")
    else:
        print(f"metadata:   {metadata_path(args.input_prefix)}")
        if metadata.get("documents") != documents.num_documents or metadata.get("tokens") != documents.num_tokens:
            print(f"            WARNING: it describes {metadata.get('documents')} documents and {metadata.get('tokens')} "
                  f"tokens, so it belongs to another version of the token files")
        print(json.dumps(metadata, indent=2, sort_keys=True))

    if args.document is None:
        return
    if not 0 <= args.document < documents.num_documents:
        raise DataError(f"--document {args.document} is out of range; the file has {documents.num_documents} documents")
    ids = documents.document(args.document)
    print(f"\ndocument {args.document}: {len(ids)} tokens")
    print(f"ids: {ids[:64].tolist()}{' ...' if len(ids) > 64 else ''}")
    if args.tokenizer_name_or_path:
        from fleetlm.tokenizer import load_tokenizer

        text = load_tokenizer(args.tokenizer_name_or_path).decode(ids.tolist())
        print(f"text:\n{text[:args.max_chars]}{' ...' if len(text) > args.max_chars else ''}")


if __name__ == "__main__":
    run_tool(main)

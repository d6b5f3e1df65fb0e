#!/usr/bin/env python3
"""The baseline of scripts/bench-serve.sh: a minimal PyTorch/transformers reward server.

POST /score with {"prompt": str, "completions": [str, ...]} answers
{"rewards": [...], "logits": [...]} as `rcx serve` does, from the same model folder
(BertForSequenceClassification, one label; the pair encoding cut longest-first to the
model's training max_length). One request per forward pass, one forward at a time: the
way a reward model is usually put behind HTTP without a batching layer.

Usage: serve_torch.py --model DIR --port N [--threads N]
Prints "serve_torch: listening on http://127.0.0.1:PORT" on stderr when ready.
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import BertForSequenceClassification, BertTokenizerFast


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = BertForSequenceClassification.from_pretrained(args.model, num_labels=1).eval()
    tokenizer = BertTokenizerFast(os.path.join(args.model, "vocab.txt"), do_lower_case=True)
    max_length = 512
    meta = os.path.join(args.model, "rcx.json")
    if os.path.exists(meta):
        with open(meta) as f:
            max_length = json.load(f)["max_length"]
    forward_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK hold each answer back by tens of milliseconds.
        disable_nagle_algorithm = True

        def log_message(self, *_):
            pass

        def answer(self, status, value):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("content-length", 0))
            try:
                request = json.loads(self.rfile.read(length))
                prompt, completions = request["prompt"], request["completions"]
            except (ValueError, KeyError, TypeError) as e:
                self.answer(400, {"error": str(e)})
                return
            batch = tokenizer(
                [prompt] * len(completions),
                completions,
                truncation="longest_first",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            with forward_lock, torch.inference_mode():
                logits = model(**batch).logits[:, 0]
            self.answer(
                200,
                {"rewards": torch.sigmoid(logits).tolist(), "logits": logits.tolist()},
            )

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # The default listen backlog (5) resets connections when 64 clients connect at once.
        request_queue_size = 256

    server = Server(("127.0.0.1", args.port), Handler)
    print(f"serve_torch: listening on http://127.0.0.1:{server.server_port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

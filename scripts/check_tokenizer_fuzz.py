#!/usr/bin/env python3
"""Compares `rcx tokenize` with Hugging Face's BertTokenizerFast on random strings that are
not in the committed fixture: random code points from ~75 Unicode blocks, vocabulary words
with random case and accents, special tokens, zero-width and combining marks, very long
words, tabs and newlines; single texts and pairs with random max_length. Not a test (it
needs transformers); run it by hand after changing the tokenizer:

    $PYTHON scripts/check_tokenizer_fuzz.py target/release/rcx 2000 1

Prints the mismatches (at most 10) and their count; exits 1 if there is any.
"""
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from transformers import BertTokenizerFast
VOCAB=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),"data","vocab.txt"); RCX=sys.argv[1]; N=int(sys.argv[2]); SEED=int(sys.argv[3])
tok = BertTokenizerFast(VOCAB, do_lower_case=True)
rng = random.Random(SEED)
BLOCKS = [(0x20,0x7E),(0x80,0xFF),(0x100,0x24F),(0x250,0x2FF),(0x300,0x36F),(0x370,0x3FF),(0x400,0x4FF),(0x530,0x58F),
 (0x590,0x5FF),(0x600,0x6FF),(0x700,0x74F),(0x900,0x97F),(0x980,0x9FF),(0xA00,0xAFF),(0xB00,0xDFF),(0xE00,0xE7F),(0xE80,0xEFF),
 (0xF00,0xFFF),(0x1000,0x109F),(0x10A0,0x10FF),(0x1100,0x11FF),(0x1200,0x139F),(0x1700,0x17FF),(0x1800,0x18AF),(0x1A00,0x1AFF),
 (0x1B00,0x1BFF),(0x1C80,0x1CFF),(0x1D00,0x1DFF),(0x1E00,0x1EFF),(0x1F00,0x1FFF),(0x2000,0x206F),(0x2070,0x20CF),(0x20D0,0x20FF),
 (0x2100,0x218F),(0x2190,0x23FF),(0x2460,0x24FF),(0x2500,0x27BF),(0x2C00,0x2E7F),(0x2E80,0x2FDF),(0x3000,0x303F),(0x3040,0x30FF),
 (0x3100,0x31FF),(0x3200,0x33FF),(0x3400,0x4DBF),(0x4E00,0x9FFF),(0xA000,0xA4CF),(0xA500,0xA8FF),(0xA900,0xABFF),(0xAC00,0xD7AF),
 (0xD7B0,0xD7FF),(0xE000,0xE0FF),(0xF900,0xFAFF),(0xFB00,0xFB4F),(0xFB50,0xFDFF),(0xFE00,0xFE6F),(0xFE70,0xFEFF),(0xFF00,0xFFEF),
 (0xFFF0,0xFFFF),(0x10000,0x1007F),(0x10900,0x10FFF),(0x11000,0x11FFF),(0x16800,0x16FFF),(0x1B000,0x1B2FF),(0x1BC00,0x1BCAF),
 (0x1D100,0x1D1FF),(0x1D400,0x1D7FF),(0x1E000,0x1EFFF),(0x1F000,0x1F0FF),(0x1F100,0x1F2FF),(0x1F300,0x1FAFF),(0x20000,0x2FA1F),
 (0x30000,0x3134F),(0xE0000,0xE01EF),(0xF0000,0xF00FF),(0x10FF00,0x10FFFF)]
SPECIAL=["[CLS]","[SEP]","[PAD]","[UNK]","[MASK]","[cls]","[","]","##","\u200d","\ufe0f","\u0301","\u0345","\t","\n"," ","  "]
words=[w for w in open(VOCAB,encoding="utf-8").read().split("\n") if w and not w.startswith("[")]
def rand_char():
    r=rng.random()
    if r<0.05:
        while True:
            c=rng.randrange(1,0x110000)
            if not 0xD800<=c<=0xDFFF: return chr(c)
    lo,hi=rng.choice(BLOCKS); c=rng.randint(lo,hi)
    return chr(c) if not 0xD800<=c<=0xDFFF else "x"
def rand_word():
    r=rng.random()
    if r<0.4:
        w=rng.choice(words)
        if w.startswith("##"): w=rng.choice(words)+w[2:]
        m=rng.random()
        if m<0.2: w=w.upper()
        elif m<0.4: w=w.capitalize()
        elif m<0.5: w=''.join(ch+rng.choice(["\u0301","\u0308","\u0323","\u0327",""]) for ch in w)
        return w
    if r<0.5: return rng.choice(SPECIAL)
    if r<0.52: return rng.choice("abcdefghé")*rng.randint(90,110)
    return ''.join(rand_char() for _ in range(rng.randint(1,8)))
def rand_text():
    n=rng.choice([0,1,2,3,5,8,13,30])
    seps=[" "," ","","\t","\n"," , ",". ","-"]
    return ''.join(rand_word()+rng.choice(seps) for _ in range(n)).replace("\x00","\x01")
cases=[]
for i in range(N):
    if rng.random()<0.3:
        cases.append((rand_text(), rand_text(), rng.choice([3,4,5,6,8,10,16,25,40,512])))
    else:
        cases.append((rand_text(), None, rng.choice([512]*6+[2,3,5,10,20])))
def hf(c):
    a,b,ml=c
    if b is None: e=tok([a],truncation=True,max_length=ml)
    else: e=tok([a],[b],truncation="longest_first",max_length=ml)
    return {"input_ids":e["input_ids"][0],"token_type_ids":e["token_type_ids"][0]}
def ours(c):
    a,b,ml=c
    cmd=[RCX,"tokenize","--vocab",VOCAB,"--max-length",str(ml)]
    if b is not None: cmd.append("--pair="+b)
    cmd+=["--",a]
    p=subprocess.run(cmd,capture_output=True)
    if p.returncode: return {"error":p.stderr.decode(errors="replace")}
    return json.loads(p.stdout)
with ThreadPoolExecutor(2) as ex: got=list(ex.map(ours,cases))
bad=0
for c,g in zip(cases,got):
    w=hf(c)
    if g!=w:
        bad+=1
        if bad<=10: print("MISMATCH",repr(c),"\n ours",g,"\n hf  ",w)
print(f"{N} cases ({sum(1 for c in cases if c[1] is not None)} pairs), {bad} mismatches")
sys.exit(1 if bad else 0)

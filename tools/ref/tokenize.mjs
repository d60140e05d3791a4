// Reference tokenizer for qmix's tests: the independent pure-JS implementation
// @huggingface/tokenizers (npm; installed test-only by tools/check-tokenizer.sh into build/npm).
//
// usage: node tools/ref/tokenize.mjs TOKENIZER_JSON TEXT_FILE... [--lines] [--no-special] [--regex R]
//   prints, for each file in order, the token ids of the whole file on one line, or with --lines
//   one line of ids per input line (the line without its "\n"; an empty line gives an empty
//   output line; a final "\n" ends the last line). Input bytes are
//   decoded as UTF-8 with invalid sequences replaced by U+FFFD (WHATWG), as qmix does.
//   --no-special: added tokens are treated as plain text (the added-token table is dropped).
//   --regex R: replaces the pattern of every Split pre-tokenizer (e.g. the Qwen3.5 regex).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const args = process.argv.slice(2);
const files = args.filter((a, i) => !a.startsWith("--") && args[i - 1] !== "--regex");
if (files.length < 2) {
    console.error("usage: tokenize.mjs TOKENIZER_JSON TEXT_FILE... [--lines] [--no-special] [--regex R]");
    process.exit(2);
}
const lines = args.includes("--lines");
const noSpecial = args.includes("--no-special");
const ri = args.indexOf("--regex");
const regex = ri >= 0 ? args[ri + 1] : null;

// Resolve the package from QMIX_NPM_PREFIX (default build/npm) rather than from this script's folder.
const prefix = path.resolve(process.env.QMIX_NPM_PREFIX || "build/npm");
const require = createRequire(path.join(prefix, "node_modules", "x.js"));
const { Tokenizer } = await import(require.resolve("@huggingface/tokenizers").replace(/\.cjs$/, ".mjs"));

const tj = JSON.parse(readFileSync(files[0], "utf8"));
if (noSpecial) tj.added_tokens = [];
if (regex) {
    const fix = (p) => {
        if (!p) return;
        if (p.type === "Split") p.pattern = { Regex: regex };
        if (p.type === "Sequence") p.pretokenizers.forEach(fix);
    };
    fix(tj.pre_tokenizer);
}
const tok = new Tokenizer(tj, {});
const enc = (s) => tok.encode(s, { add_special_tokens: false }).ids.join(" ");
const out = [];
for (const f of files.slice(1)) {
    const text = new TextDecoder("utf-8").decode(readFileSync(f));
    if (lines) {
        const parts = text.split("\n");
        if (parts.length && parts[parts.length - 1] === "") parts.pop();
        for (const l of parts) out.push(enc(l));
    } else {
        out.push(enc(text));
    }
}
process.stdout.write(out.join("\n") + "\n");

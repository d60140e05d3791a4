#!/usr/bin/env python3
"""Reference renderer for chat templates: python3-jinja2 set up as Hugging Face transformers does
(transformers/utils/chat_template_utils.py, _compile_jinja_template):

  ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                extensions=[jinja2.ext.loopcontrols])
  tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) = json.dumps(...)
  raise_exception(msg) raises; strftime_now(fmt) = datetime.now().strftime(fmt)
  template.render(messages=..., tools=..., documents=None, add_generation_prompt=..., **kwargs)

Before rendering, an assistant tool call's `arguments` that is a JSON string is parsed (json.loads)
and a null/empty one becomes {} -- vLLM's _postprocess_messages; the Qwen3.5 template only iterates
mappings (`arguments|items`).

usage:
  render_template.py --template T --messages conv.json [--tools tools.json]
                     [--enable-thinking true|false] [--no-generation-prompt]
      prints the rendered prompt exactly; on a template error prints it on stderr, exit 3
  render_template.py --template T --case case.json [--case case2.json ...]
      case = {"messages": [...], "tools": [...]?, "options": {"add_vision_id": true}?}; prints a JSON
      list of 4 results per case (with several cases, a list of those lists), for (add_generation_prompt, enable_thinking) in
      (T,T) (T,F) (F,T) (F,F): {"text": "..."} or {"error": "...", "raised": true|false}
      (raised: the template's own raise_exception)
exit 4 when jinja2 is not installed.
"""
import argparse
import json
import sys
from datetime import datetime

try:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
except ImportError:
    print("jinja2 is not installed", file=sys.stderr)
    sys.exit(4)


class TemplateRaised(Exception):
    pass


def raise_exception(message):
    raise TemplateRaised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(text):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(text)


def postprocess(messages):
    if not isinstance(messages, list):
        return messages
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            for call in m["tool_calls"]:
                if not isinstance(call, dict):
                    continue
                fn = call.get("function") if isinstance(call.get("function"), dict) else call
                if "arguments" not in fn:
                    continue
                a = fn["arguments"]
                if a is None or a == "":
                    fn["arguments"] = {}
                elif isinstance(a, str):
                    fn["arguments"] = json.loads(a)
    return messages


def render(template, messages, tools, add_generation_prompt, enable_thinking, extra=None):
    kwargs = dict(extra or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    return template.render(messages=postprocess(messages), tools=tools, documents=None,
                           add_generation_prompt=add_generation_prompt, **kwargs)


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def render_case(template, case):
    results = []
    for gen, think in ((True, True), (True, False), (False, True), (False, False)):
        msgs = json.loads(json.dumps(case["messages"]))
        try:
            text = render(template, msgs, case.get("tools"), gen, think, case.get("options"))
            results.append({"text": text})
        except TemplateRaised as e:
            results.append({"error": str(e), "raised": True})
        except Exception as e:  # what Jinja or Python rejects (TypeError, UndefinedError ...)
            results.append({"error": "%s: %s" % (type(e).__name__, e), "raised": False})
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--template", required=True)
    ap.add_argument("--messages")
    ap.add_argument("--tools")
    ap.add_argument("--enable-thinking", choices=["true", "false"])
    ap.add_argument("--no-generation-prompt", action="store_true")
    ap.add_argument("--case", action="append")
    a = ap.parse_args()
    with open(a.template, encoding="utf-8") as f:
        template = compile_template(f.read())
    if a.case:
        # one process for every case: interpreter start-up dominates a render
        every = [render_case(template, load(path)) for path in a.case]
        sys.stdout.write(json.dumps(every[0] if len(every) == 1 else every, ensure_ascii=False))
        return 0
    if not a.messages:
        ap.error("--messages or --case is required")
    messages = load(a.messages)
    tools = load(a.tools) if a.tools else None
    think = None if a.enable_thinking is None else a.enable_thinking == "true"
    try:
        text = render(template, messages, tools, not a.no_generation_prompt, think)
    except Exception as e:
        print("error: %s" % e, file=sys.stderr)
        return 3
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

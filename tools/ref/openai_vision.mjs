// An image through the official OpenAI client (npm `openai`) to a running `qmix serve`:
//   QMIX_OPENAI_SCRIPT=tools/ref/openai_vision.mjs tools/check-openai.sh BASE_URL API_KEY IMAGE
// sends IMAGE as a data: URL image_url part (greedy, 8 tokens, ignore_eos) and a remote URL (which
// must be refused); prints one JSON object for tests/test_vision_server.c.
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

const { default: OpenAI } = await import(pathToFileURL(process.env.QMIX_OPENAI_MODULE).href);
const [baseURL, apiKey, image] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60000 });
const model = (await client.models.list()).data[0].id;
const url = 'data:image/png;base64,' + readFileSync(image).toString('base64');
const ask = (imageUrl) => client.chat.completions.create({
    model, max_tokens: 8, temperature: 0, ignore_eos: true,
    messages: [{ role: 'user', content: [
        { type: 'image_url', image_url: { url: imageUrl } },
        { type: 'text', text: 'Describe this image in one sentence.' }] }],
});
const out = {};
const r = await ask(url);
out.reasoning = r.choices[0].message.reasoning_content ?? null;
out.content = r.choices[0].message.content;
out.usage = r.usage;
try { await ask('https://example.com/cat.png'); out.remote = 200; } catch (e) {
    out.remote = e.status ?? String(e);
    out.remote_message = e.error?.message ?? String(e);
}
console.log(JSON.stringify(out));

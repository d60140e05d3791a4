// What the official OpenAI client (npm `openai`) sees from a running `qmix serve`:
//   node tools/ref/openai_client.mjs BASE_URL API_KEY   (run through tools/check-openai.sh)
// Prints one JSON object; tests/test_server.c checks it. Requests use fixed seeds so streamed and
// non-streamed answers can be compared.
import { pathToFileURL } from 'node:url';

const { default: OpenAI } = await import(pathToFileURL(process.env.QMIX_OPENAI_MODULE).href);
const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });
const out = {};

const models = await client.models.list();
out.models = models.data.map((m) => m.id);
const model = out.models[0];
const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hello' }];

// non-streaming chat, thinking on (reasoning_content) and off (content)
const chat = await client.chat.completions.create({ model, messages, max_tokens: 10, seed: 5, temperature: 0.8 });
out.chat = {
    reasoning: chat.choices[0].message.reasoning_content ?? null,
    content: chat.choices[0].message.content,
    finish_reason: chat.choices[0].finish_reason,
    usage: chat.usage,
};

// the same request streamed, with the usage chunk
const stream = await client.chat.completions.create({
    model, messages, max_tokens: 10, seed: 5, temperature: 0.8, stream: true,
    stream_options: { include_usage: true },
});
out.stream = { reasoning: '', content: '', finish_reason: null, usage: null, chunks: 0 };
for await (const chunk of stream) {
    out.stream.chunks++;
    if (chunk.usage) out.stream.usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    if (c.delta.reasoning_content) out.stream.reasoning += c.delta.reasoning_content;
    if (c.delta.content) out.stream.content += c.delta.content;
    if (c.finish_reason) out.stream.finish_reason = c.finish_reason;
}

const noThink = await client.chat.completions.create({
    model, messages, max_tokens: 6, seed: 5, chat_template_kwargs: { enable_thinking: false },
});
out.no_think = {
    reasoning: noThink.choices[0].message.reasoning_content ?? null,
    content: noThink.choices[0].message.content,
};

// a tool call round trip: the assistant's call (arguments as a JSON string) and the tool's result
const tools = [{
    type: 'function',
    function: {
        name: 'get_weather', description: 'Weather for a city',
        parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
}];
const roundTrip = await client.chat.completions.create({
    model, tools, tool_choice: 'auto', max_tokens: 6, seed: 5,
    messages: [
        { role: 'user', content: 'Weather in Paris?' },
        { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris"}' } }] },
        { role: 'tool', tool_call_id: 'call_1', content: 'sunny, 21 C' },
    ],
});
out.tool_round_trip = { finish_reason: roundTrip.choices[0].finish_reason, usage: roundTrip.usage };

const completion = await client.completions.create({ model, prompt: 'The cat sat', max_tokens: 5, temperature: 0 });
out.completion = { text: completion.choices[0].text, finish_reason: completion.choices[0].finish_reason, usage: completion.usage };

// errors surface as the client's typed errors with their statuses
async function status(fn) {
    try { await fn(); return 200; } catch (e) { return e.status ?? String(e); }
}
out.errors = {
    bad_key: await status(() => new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 }).models.list()),
    unknown_model: await status(() => client.chat.completions.create({ model: 'no-such-model', messages })),
    bad_type: await status(() => client.chat.completions.create({ model, messages, temperature: 'hot' })),
    context_overflow: await status(() => client.chat.completions.create({
        model, messages: [{ role: 'user', content: 'word '.repeat(5000) }],
    })),
};
process.stdout.write(JSON.stringify(out) + '\n');

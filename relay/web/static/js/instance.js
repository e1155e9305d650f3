// An instance's page (/i/{id}): status (live), a playground that streams a
// chat through the public API, snippets to copy, and the owner's view.

import {
  $, agentCommands, announce, ApiError, api, badge, callerKeys, el, errorOf, lastSeen, ownerTokens, plural, py,
  relayInfo, sh, showError, snippet, tickTimes, watch,
} from './common.js';
import { render } from './markdown.js';
import { sseEvents } from './sse.js';

const id = location.pathname.split('/').filter(Boolean).pop();
let view = null;

// -- overview (live) ---------------------------------------------------------------

function showOverview() {
  $('#page').dataset.models = view.models.join('\n');
  document.title = `${view.name} · instance-relay`;
  $('#overview').replaceChildren(
    el('h1', {}, el('span', { id: 'instance-name', text: view.name }), ' ', badge(view.status),
      view.visibility === 'private' ? el('span', { class: 'badge private', text: 'private' }) : null),
    view.description ? el('p', { id: 'instance-description', text: view.description }) : null,
    el('dl', { class: 'facts' },
      el('dt', { text: 'Status' }), el('dd', { id: 'instance-status', 'data-status': view.status },
        `${view.status} · ${plural(view.agents, 'agent')} · `, lastSeen(view)),
      el('dt', { text: 'Models' }), el('dd', {}, view.models.length
        ? el('ul', { class: 'chips' }, view.models.map((m) => el('li', { text: m })))
        : el('span', { class: 'muted', text: 'none reported yet' })),
      view.image_models.length ? [el('dt', { text: 'Image models' }),
        el('dd', {}, el('ul', { class: 'chips' }, view.image_models.map((m) => el('li', { text: m }))))] : null,
      el('dt', { text: 'Chat URL' }), el('dd', {}, el('code', { text: view.chat_url })),
      el('dt', { text: 'Instance id' }), el('dd', {}, el('code', { text: view.instance_id })),
    ),
  );
  const select = $('#model');
  const chosen = select.value;
  select.replaceChildren(...(view.models.length ? view.models : ['default']).map(
    (m) => el('option', { value: m, text: m, selected: m === chosen })));
  $('#key-row').hidden = view.visibility !== 'private' && !callerKeys.get(id);
}

// -- snippets ----------------------------------------------------------------------------

async function showSnippets() {
  const base = (await relayInfo().catch(() => null))?.base_url ?? location.origin;
  const chat = view.chat_url;
  const model = view.models[0] ?? 'default';
  const keyed = view.visibility === 'private';
  const key = keyed ? 'os.environ["RELAY_API_KEY"]' : '"unused"';
  const imports = keyed ? 'import os\n\n' : '';
  const body = JSON.stringify({ model, messages: [{ role: 'user', content: 'Hello!' }] });
  const list = [
    ['curl (Server-Sent Events)', [
      `curl -N ${sh(`${chat}/chat/completions`)} \\`,
      "  -H 'Content-Type: application/json' \\",
      ...(keyed ? ['  -H "Authorization: Bearer $RELAY_API_KEY" \\'] : []),
      `  -d ${sh(body)}`].join('\n'), 'curl'],
    ['Python, openai SDK (this instance\'s URL)', `${imports}from openai import OpenAI

client = OpenAI(base_url=${py(chat)}, api_key=${key})
stream = client.chat.completions.create(
    model=${py(model)}, messages=[{"role": "user", "content": "Hello!"}], stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()`, 'openai-instance'],
    ['Python, openai SDK (one base URL for every instance)', `${imports}from openai import OpenAI

client = OpenAI(base_url=${py(`${base}/v1`)}, api_key=${key})
reply = client.chat.completions.create(
    model=${py(`${view.instance_id}/${model}`)}, messages=[{"role": "user", "content": "Hello!"}])
print(reply.choices[0].message.content)`, 'openai-global'],
    ['LangChain (pip install langchain-openai)', `${imports}from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url=${py(`${base}/v1`)}, api_key=${key}, model=${py(`${view.instance_id}/${model}`)})
print(llm.invoke("Hello!").content)`, 'langchain'],
    ['Dify client (pip install dify-client): conversations kept by the relay', `${imports}from dify_client import ChatClient

client = ChatClient(${key})
client.base_url = ${py(chat)}
reply = client.create_chat_message(inputs={}, query="Hello!", user="me")
reply.raise_for_status()
print(reply.json()["answer"])`, 'dify'],
  ];
  $('#snippets').replaceChildren(
    ...(keyed ? [el('p', { class: 'hint', text: 'Private instance: set RELAY_API_KEY to a caller key from its owner.' })] : []),
    ...list.map(([title, code, name]) => snippet(title, code, { name })));
}

// -- playground ----------------------------------------------------------------------------

const messages = [];
let running = null;
// Bumped by "New chat": a turn still finishing must not write into the next conversation.
let conversation = 0;

function turn(role, text) {
  const li = el('li', { class: role }, el('span', { class: 'who', text: role === 'user' ? 'You' : view.name }));
  if (role === 'user') li.append(text);
  $('#transcript').append(li);
  return li;
}

function headers() {
  const out = { 'Content-Type': 'application/json', Accept: 'text/event-stream' };
  const key = $('#caller-key').value.trim();
  callerKeys.set(id, key);
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

function stats({ started, first, last, tokens, usage }) {
  const parts = [];
  if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
  const count = usage?.completion_tokens ?? tokens;
  if (first !== null && last > first && count > 1) {
    parts.push(`${((count - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
  }
  if (count) parts.push(`${count} ${usage ? 'tokens' : 'chunks'}`);
  $('#stats').textContent = parts.join(' · ');
}

async function send() {
  const text = $('#prompt').value.trim();
  if (!text || running) return;
  showError($('#chat-error'), null);
  messages.push({ role: 'user', content: text });
  turn('user', text);
  $('#prompt').value = '';
  const bubble = turn('assistant');
  const answer = el('div', { class: 'answer' });
  bubble.append(answer);
  const controller = new AbortController();
  const mine = conversation;
  running = controller;
  $('#send').disabled = true;
  $('#stop').disabled = false;
  bubble.setAttribute('aria-busy', 'true');
  const measure = { started: performance.now(), first: null, last: null, tokens: 0, usage: null };
  let content = '';
  let scheduled = false;
  let cost = 0; // how long the last paint took: long answers are repainted less often
  const paint = () => {
    scheduled = false;
    const started = performance.now();
    try {
      answer.replaceChildren(...render(content).childNodes);
    } catch {
      answer.replaceChildren(el('p', { text: content })); // never lose the text to a rendering bug
    }
    cost = performance.now() - started;
  };
  const schedule = () => {
    if (scheduled) return;
    scheduled = true;
    setTimeout(() => requestAnimationFrame(paint), Math.min(1000, cost * 4));
  };
  try {
    const response = await fetch(`/api/chat/${id}/chat/completions`, {
      method: 'POST', headers: headers(), signal: controller.signal, credentials: 'omit', cache: 'no-store',
      body: JSON.stringify({
        model: $('#model').value, messages, stream: true, stream_options: { include_usage: true },
      }),
    });
    if (!response.ok) throw await errorOf(response);
    for await (const event of sseEvents(response.body)) {
      if (event.data === '[DONE]') break;
      const chunk = JSON.parse(event.data);
      if (chunk.error) throw new ApiError(chunk.error.status ?? 502, chunk.error.message, chunk.error.code);
      if (chunk.usage) measure.usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (!delta) continue;
      const now = performance.now();
      measure.first ??= now;
      measure.last = now;
      measure.tokens += 1;
      content += delta;
      schedule();
      stats(measure);
    }
    stats(measure);
    bubble.dataset.state = 'done';
  } catch (error) {
    if (error.name === 'AbortError') {
      bubble.classList.add('stopped');
      bubble.dataset.state = 'stopped';
    } else {
      bubble.dataset.state = 'error';
      bubble.append(el('p', { class: 'error', text: error.message }));
      showError($('#chat-error'), error);
      if (error.status === 401 || error.status === 403) $('#key-row').hidden = false;
    }
  } finally {
    running = null;
    $('#send').disabled = false;
    $('#stop').disabled = true;
    bubble.removeAttribute('aria-busy');
    if (content) paint();
    if (mine === conversation) {
      // What the model said (even when stopped or cut off) is the next turn's context;
      // a question that got no answer at all is dropped.
      if (content) messages.push({ role: 'assistant', content });
      else messages.pop();
    }
    announce(bubble.dataset.state === 'done' ? `Answer complete. ${$('#stats').textContent}`
      : bubble.dataset.state === 'stopped' ? 'Stopped.' : `The answer failed: ${$('#chat-error').textContent}`);
  }
}

$('#chat-form').addEventListener('submit', (event) => {
  event.preventDefault();
  send();
});
$('#prompt').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    send();
  }
});
// Aborting the fetch closes the connection: the relay cancels the stream at the agent, which
// aborts its request to the model.
$('#stop').addEventListener('click', () => running?.abort());
$('#clear').addEventListener('click', () => {
  conversation += 1;
  running?.abort();
  messages.length = 0;
  $('#transcript').replaceChildren();
  $('#stats').textContent = '';
  showError($('#chat-error'), null);
});

// -- owner view ------------------------------------------------------------------------------

function owned(path, options = {}) {
  return api(`/api/instances/${id}${path}`, { ...options, token: ownerTokens.get(id) });
}

async function showOwner() {
  const token = ownerTokens.get(id);
  $('#unlock-form').hidden = Boolean(token);
  if (!token) {
    $('#owner-panel').hidden = true;
    return;
  }
  try {
    const [settings, keys] = await Promise.all([owned('/settings'), owned('/keys')]);
    fillSettings(settings);
    fillKeys(keys.data);
    // Shown once its fields hold the settings: shown before, what the owner typed
    // meanwhile was overwritten when they arrived.
    $('#owner-panel').hidden = false;
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      ownerTokens.forget(id);
      $('#unlock-form').hidden = false;
      $('#owner-panel').hidden = true;
    }
    showError($('#owner-error'), error.status === 401 || error.status === 403
      ? new Error(`That token does not own this instance (${error.message}).`) : error);
  }
}

function fillSettings(settings) {
  $('#set-name').value = settings.name;
  $('#set-description').value = settings.description;
  $('#set-visibility').value = settings.visibility;
  $('#set-introduction').value = settings.introduction;
  $('#set-variables').value = settings.variables.length ? JSON.stringify(settings.variables, null, 2) : '';
  $('#set-conversations').checked = settings.conversations;
}

function fillKeys(keys) {
  $('#keys-table tbody').replaceChildren(...keys.map((key) => el('tr', { 'data-key': key.key_id },
    el('td', { text: key.name }),
    el('td', {}, el('code', { text: key.key_id })),
    el('td', {}, el('time', { datetime: new Date(key.created_at * 1000).toISOString(),
      text: new Date(key.created_at * 1000).toLocaleString() })),
    el('td', {}, el('button', {
      type: 'button', class: 'secondary', text: 'Revoke', 'aria-label': `Revoke key ${key.name}`,
      onclick: () => revoke(key.key_id),
    })),
  )));
  if (!keys.length) {
    $('#keys-table tbody').append(el('tr', {}, el('td', { colspan: 4, class: 'muted', text: 'No caller keys.' })));
  }
}

async function revoke(keyId) {
  try {
    await owned(`/keys/${encodeURIComponent(keyId)}`, { method: 'DELETE' });
    fillKeys((await owned('/keys')).data);
    showError($('#keys-error'), null);
    announce('Key revoked.');
    $('#key-name').focus(); // its row (and button) is gone
  } catch (error) {
    showError($('#keys-error'), error);
  }
}

$('#unlock-form').addEventListener('submit', (event) => {
  event.preventDefault();
  ownerTokens.set(id, $('#owner-token').value.trim());
  $('#owner-token').value = '';
  showError($('#owner-error'), null);
  showOwner();
});

$('#settings-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  $('#settings-status').textContent = '';
  showError($('#settings-error'), null);
  try {
    const raw = $('#set-variables').value.trim();
    let variables;
    try {
      variables = raw ? JSON.parse(raw) : [];
    } catch (error) {
      throw new Error(`Input variables: not JSON (${error.message})`);
    }
    view = await owned('', {
      method: 'PATCH',
      body: {
        name: $('#set-name').value.trim(), description: $('#set-description').value.trim(),
        visibility: $('#set-visibility').value, introduction: $('#set-introduction').value,
        conversations: $('#set-conversations').checked, variables,
      },
    });
    showOverview();
    showSnippets();
    $('#settings-status').textContent = 'Saved.';
  } catch (error) {
    showError($('#settings-error'), error);
  }
});

$('#key-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  showError($('#keys-error'), null);
  try {
    const created = await owned('/keys', { method: 'POST', body: { name: $('#key-name').value.trim() } });
    $('#key-name').value = '';
    $('#new-key').replaceChildren(
      el('p', { class: 'warning' }, el('strong', { text: 'Copy the new key now: it is shown only once.' })),
      snippet(`New key "${created.name}"`, created.key, { name: 'caller-key' }),
    );
    $('#new-key button').focus();
    fillKeys((await owned('/keys')).data);
  } catch (error) {
    showError($('#keys-error'), error);
  }
});

function twoStep(start, confirm, yes, no, action) {
  $(start).addEventListener('click', () => { $(confirm).hidden = false; $(yes).focus(); });
  $(no).addEventListener('click', () => { $(confirm).hidden = true; $(start).focus(); });
  $(yes).addEventListener('click', async () => {
    $(confirm).hidden = true;
    await action();
  });
}

twoStep('#rotate', '#rotate-confirm', '#rotate-yes', '#rotate-no', async () => {
  showError($('#token-error'), null);
  try {
    const rotated = await owned('/token', { method: 'POST' });
    ownerTokens.set(id, rotated.agent_token);
    const base = (await relayInfo().catch(() => null))?.base_url ?? location.origin;
    $('#new-token').replaceChildren(
      el('p', { class: 'warning' }, el('strong', { text: 'New agent token: copy it now, it is shown only once. ' }),
        'Agents using the old token were disconnected; restart them with the new one.'),
      snippet('New agent token', rotated.agent_token, { name: 'agent-token' }),
      ...agentCommands(base, rotated.agent_token).map(([title, code, name]) => snippet(title, code, { name })),
    );
    $('#new-token button').focus();
  } catch (error) {
    showError($('#token-error'), error);
  }
});

twoStep('#delete', '#delete-confirm', '#delete-yes', '#delete-no', async () => {
  try {
    await owned('', { method: 'DELETE' });
    ownerTokens.forget(id);
    location.assign('/');
  } catch (error) {
    showError($('#delete-error'), error);
  }
});

$('#forget').addEventListener('click', () => {
  ownerTokens.forget(id);
  showOwner();
});

// -- start -----------------------------------------------------------------------------------

try {
  view = await api(`/api/instances/${id}`);
} catch (error) {
  if (!(error instanceof ApiError) || error.status !== 404) throw error;
}
if (!view) {
  $('#missing').hidden = false;
} else {
  $('#page').hidden = false;
  $('#caller-key').value = callerKeys.get(id);
  showOverview();
  showSnippets();
  showOwner();
  tickTimes();
  watch([id], {
    onView(next) {
      const before = view;
      view = next;
      showOverview();
      if (before.status !== view.status) announce(`${view.name} is now ${view.status}`);
      if (before.models.join('\n') !== view.models.join('\n') || before.visibility !== view.visibility) {
        showSnippets();
      }
    },
    onDeleted() {
      $('#page').hidden = true;
      $('#missing').hidden = false;
    },
  });
}

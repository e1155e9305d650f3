// Register (/register): name and description -> instance id, chat URL, the
// agent token (shown once), the commands to start the agent; then wait for
// the instance to come online.

import { $, agentCommands, api, el, ownerTokens, plural, relayInfo, showError, snippet, watch } from './common.js';

let info = null;

$('#register-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const button = $('#register-button');
  button.disabled = true;
  showError($('#register-error'), null);
  try {
    const body = { name: $('#name').value.trim() };
    const description = $('#description').value.trim();
    if (description) body.description = description;
    const created = await api('/api/instances', {
      method: 'POST', body, token: $('#registration-key').value.trim() || undefined,
    });
    $('#registration-key').value = '';
    shown(created, info?.base_url ?? location.origin);
  } catch (error) {
    showError($('#register-error'), error);
  } finally {
    button.disabled = false;
  }
});

function shown(created, baseUrl) {
  const id = created.instance_id;
  // The owner view on the instance page opens without pasting the token again, in this tab.
  ownerTokens.set(id, created.agent_token);
  $('#register-panel').hidden = true;
  $('#result').hidden = false;
  $('#result-facts').replaceChildren(
    el('dt', { text: 'Name' }), el('dd', { text: created.name }),
    el('dt', { text: 'Instance id' }), el('dd', {}, el('code', { text: id, 'data-field': 'instance_id' })),
    el('dt', { text: 'Chat URL' }), el('dd', {}, el('code', { text: created.chat_url, 'data-field': 'chat_url' })),
    el('dt', { text: 'Instance page' }), el('dd', {}, el('a', { href: `/i/${id}`, text: `/i/${id}` })),
  );
  $('#token-block').replaceChildren(snippet('Agent token', created.agent_token, { name: 'agent-token' }));
  $('#commands').replaceChildren(...agentCommands(baseUrl, created.agent_token)
    .map(([title, code, name]) => snippet(title, code, { name })));
  const wait = $('#wait');
  wait.textContent = 'Waiting for the agent to connect…';
  watch([id], {
    onView(view) {
      if (view.status !== 'online') return;
      wait.replaceChildren(
        el('strong', { class: 'ok', text: 'Online' }),
        ` — ${plural(view.agents, 'agent')} connected, serving ${view.models.join(', ') || 'its default model'}. `,
        el('a', { href: `/i/${id}`, text: 'Open the instance page' }), '.',
      );
      wait.dataset.status = 'online';
    },
  });
}

// The button is disabled in the page until here: a submit before the script runs
// would post the form itself.
info = await relayInfo().catch(() => null);
if (info?.registration === 'key_required') {
  $('#key-field').hidden = false;
  $('#registration-key').required = true;
}
$('#register-button').disabled = false;

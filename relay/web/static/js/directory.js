// The directory (/): public instances, online first, searchable, paged, live.
//
// Two lists, each a page of PAGE instances read from GET /api/instances with
// a status filter; Previous/Next walk a stack of cursors.  The cards shown
// (at most 2 × PAGE, within the 100 ids one status stream may follow) are
// followed live through GET /api/instances/events.

import { $, api, badge, el, lastSeen, plural, showError, tickTimes, watch } from './common.js';

const PAGE = 24;
const lists = {
  online: { cursors: [''], index: 0, next: null, asked: 0 },
  offline: { cursors: [''], index: 0, next: null, asked: 0 },
};
// A search examines a bounded stretch of the registry per request: an empty stretch is
// followed by itself this many times before the page says so.
const EMPTY_STRETCHES = 5;
let query = '';
let live = { close() {} };

function card(view) {
  const li = el('li', { class: 'card', 'data-instance': view.instance_id });
  fill(li, view);
  return li;
}

function fill(li, view) {
  li.dataset.status = view.status;
  li.replaceChildren(
    el('header', {},
      el('h3', {}, el('a', { href: `/i/${view.instance_id}`, text: view.name })),
      badge(view.status)),
    view.description ? el('p', { class: 'desc', text: view.description }) : null,
    view.models.length ? el('ul', { class: 'chips', 'aria-label': 'Models' },
      view.models.map((m) => el('li', { text: m }))) : null,
    el('p', { class: 'meta' }, `${plural(view.agents, 'agent')} · `, lastSeen(view)),
  );
}

async function load(status) {
  const list = lists[status];
  // Answers may come back out of order (typing fast): only the last one asked is shown.
  const asked = ++list.asked;
  let page;
  for (let stretch = 0; ; stretch++) {
    const params = new URLSearchParams({ status, limit: String(PAGE) });
    if (list.cursors[list.index]) params.set('cursor', list.cursors[list.index]);
    if (query) params.set('q', query);
    page = await api(`/api/instances?${params}`);
    if (asked !== list.asked) return;
    if (page.data.length || !page.next_cursor || stretch + 1 >= EMPTY_STRETCHES) break;
    list.cursors[list.index] = page.next_cursor; // nothing in that stretch: look further
  }
  list.next = page.next_cursor;
  $(`#${status}-list`).replaceChildren(...page.data.map(card));
  $(`#${status}-empty`).textContent = query ? (list.next ? 'No match so far: Next searches further.' : 'No match.')
    : (status === 'online' ? 'No public instance is online right now.' : 'None.');
  hints();
  const pager = $(`#${status}-pager`);
  pager.hidden = list.index === 0 && !list.next;
  pager.querySelector('[data-page=prev]').disabled = list.index === 0;
  pager.querySelector('[data-page=next]').disabled = !list.next;
}

function hints() {
  for (const status of Object.keys(lists)) {
    $(`#${status}-empty`).hidden = $(`#${status}-list`).children.length > 0
      || (lists[status].index > 0 && !query);
  }
}

function follow() {
  live.close();
  const ids = [...document.querySelectorAll('li.card[data-instance]')].map((li) => li.dataset.instance);
  live = watch(ids.slice(0, 100), {
    onView(view) {
      const li = document.querySelector(`li.card[data-instance="${view.instance_id}"]`);
      if (!li) return;
      if (view.visibility !== 'public') {
        li.remove(); // made private: no longer advertised
        hints();
        return;
      }
      fill(li, view);
      // Online first: a card whose status changed moves to the top of the other list.
      const list = $(`#${view.status}-list`);
      if (li.parentElement !== list) {
        list.prepend(li);
        hints();
      }
    },
    onDeleted(id) {
      document.querySelector(`li.card[data-instance="${id}"]`)?.remove();
      hints();
    },
    onState(state) {
      $('#live-state').textContent = state === 'live' ? 'Live: statuses update as agents come and go.'
        : 'Reconnecting to live updates…';
    },
  });
}

async function refresh(which = ['online', 'offline']) {
  try {
    await Promise.all(which.map(load));
    showError($('#list-error'), null);
  } catch (error) {
    showError($('#list-error'), error);
  }
  follow();
}

function pagerClicks(status) {
  $(`#${status}-pager`).addEventListener('click', (event) => {
    const list = lists[status];
    const button = event.target.closest('button[data-page]');
    if (!button) return;
    if (button.dataset.page === 'next' && list.next) {
      list.cursors[list.index + 1] = list.next;
      list.index += 1;
    } else if (button.dataset.page === 'prev' && list.index > 0) {
      list.index -= 1;
    }
    refresh([status]);
  });
}

function search(text) {
  query = text.trim();
  for (const list of Object.values(lists)) Object.assign(list, { cursors: [''], index: 0, next: null });
  refresh();
}

let typing;
$('#q').addEventListener('input', (event) => {
  clearTimeout(typing);
  typing = setTimeout(() => search(event.target.value), 300);
});
$('#search-form').addEventListener('submit', (event) => {
  event.preventDefault();
  clearTimeout(typing);
  search($('#q').value);
});
pagerClicks('online');
pagerClicks('offline');
tickTimes();
refresh();

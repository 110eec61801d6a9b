/* cxrtrek viewer: plain JavaScript, no libraries, nothing fetched but the API's own routes.
 *
 * Served by `cxrtrek api` at /, it talks to /v1 with the API's bearer token (typed in the
 * bar, or given as #token=...). Embedded in a file by `cxrtrek view`, it draws the run in the
 * <script id="cxrtrek-run"> element and fetches nothing.
 */
(function () {
  'use strict';

  var STAGE_COUNT = 8;
  var TITLES = ['Quality and view', 'Findings identification', 'Attributes and localization',
    'Relationships among findings', 'Comparison with the prior study', 'Future trend',
    'Diagnosis and advice', 'Report'];
  var FINAL_EVENTS = { report: true, review: true, error: true };

  var state = {
    mode: 'live',        // 'live' (served by the API) or 'static' (a file of cxrtrek view)
    token: '',
    runId: null,
    doc: null,           // the run's document (GET /v1/runs/{id}/view)
    live: {},            // stage number -> {result, elapsed_s}, from the event stream
    events: [],          // every event received: {name, stage, id}
    lastEventId: -1,
    lastFinal: null,
    stream: null,        // the AbortController of the open event stream
    imageIndex: 0,
    hidden: {},          // finding (lower case) -> true when its boxes are hidden
    images: {},          // run/index -> {gray: Uint8ClampedArray, width, height}
    wl: { window: 255, level: 127.5 },
    traceStage: null,
    diff: null,
    editor: null,        // the correction being typed: {stage, qid, value, runId}
    highlighted: null,   // the question whose boxes are highlighted (its answer is hovered)
    files: { images: [], prior: [] },
    refreshTimer: null,
    refreshing: null
  };

  // --- small helpers -------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function h(tag, attrs) {
    var el = document.createElement(tag);
    var key;
    attrs = attrs || {};
    for (key in attrs) {
      if (!Object.prototype.hasOwnProperty.call(attrs, key) || attrs[key] == null) continue;
      if (key === 'text') el.textContent = attrs[key];
      else if (key === 'cls') el.className = attrs[key];
      else if (key.slice(0, 2) === 'on') el.addEventListener(key.slice(2), attrs[key]);
      else el.setAttribute(key, attrs[key]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child == null || child === false) continue;
      el.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return el;
  }

  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

  function seconds(value) {
    return value == null ? '' : (value < 10 ? value.toFixed(2) : value.toFixed(1)) + ' s';
  }

  function notice(text, kind) {
    var el = $('notice');
    el.textContent = text || '';
    el.className = kind || '';
  }

  function enc(id) { return encodeURIComponent(id); }

  function isActive(status) { return status === 'queued' || status === 'running'; }

  // --- the API -------------------------------------------------------------------------------

  function headers(extra) {
    var out = {};
    if (state.token) out.Authorization = 'Bearer ' + state.token;
    for (var k in extra || {}) out[k] = extra[k];
    return out;
  }

  function api(path, options) {
    options = options || {};
    var init = { method: options.method || 'GET', headers: headers(options.headers) };
    if (options.json !== undefined) {
      init.body = JSON.stringify(options.json);
      init.headers['Content-Type'] = 'application/json';
    } else if (options.body !== undefined) {
      init.body = options.body;
    }
    return fetch(path, init).then(function (response) {
      var type = response.headers.get('content-type') || '';
      var body = type.indexOf('json') >= 0 ? response.json() : response.text();
      return body.then(function (data) {
        if (response.ok) return data;
        var err = data && data.error ? data.error : { type: 'HTTP ' + response.status, message: String(data) };
        if (response.status === 401) {
          notice('The API wants its bearer token: type it in the token field.', 'error');
        }
        var e = new Error(err.type + ': ' + err.message);
        e.status = response.status;
        throw e;
      });
    });
  }

  // --- runs ----------------------------------------------------------------------------------

  function loadRuns() {
    return api('/v1/runs').then(function (body) {
      var list = clear($('runs'));
      body.runs.forEach(function (run) {
        list.appendChild(h('li', {
          cls: run.run_id === state.runId ? 'current' : '', 'data-run': run.run_id,
          onclick: function () { openRun(run.run_id); }
        }, h('div', { cls: 'rid', text: run.run_id }),
        h('span', { cls: 'status ' + run.status, text: run.status.replace('_', ' ') }),
        run.forked_from ? ' fork of ' + run.forked_from.run_id + ' after stage ' + run.forked_from.stage : ''));
      });
      if (!body.runs.length) list.appendChild(h('li', { cls: 'none', text: 'no runs yet' }));
    }).catch(function (e) { if (e.status !== 401) notice('runs: ' + e.message, 'error'); });
  }

  function openRun(runId) {
    if (state.stream) state.stream.abort();
    state.runId = runId;
    state.doc = null;
    state.live = {};
    state.events = [];
    state.lastEventId = -1;
    state.lastFinal = null;
    state.imageIndex = 0;
    state.hidden = {};
    state.traceStage = null;
    state.diff = null;
    state.editor = null;
    state.highlighted = null;
    $('empty').hidden = true;
    $('run').hidden = false;
    $('diff').hidden = true;
    $('trace').hidden = true;
    if (state.mode === 'live') {
      history.replaceState(null, '', '#run=' + enc(runId));
      Array.prototype.forEach.call(document.querySelectorAll('#runs li'), function (li) {
        li.classList.toggle('current', li.getAttribute('data-run') === runId);
      });
    }
    return refresh().then(function () { follow(runId); });
  }

  function refresh() {
    var runId = state.runId;
    if (state.refreshing) {  // one at a time; ask again when it is done
      state.refreshAgain = true;
      return state.refreshing;
    }
    state.refreshing = api('/v1/runs/' + enc(runId) + '/view').then(function (doc) {
      if (runId !== state.runId) return;
      state.doc = doc;
      render();
      if (doc.forked_from && !isActive(doc.status) && !state.diff) loadDiff();
    }).catch(function (e) {
      notice('run ' + runId + ': ' + e.message, 'error');
    }).then(function () {
      state.refreshing = null;
      if (state.refreshAgain) {
        state.refreshAgain = false;
        return refresh();
      }
    });
    return state.refreshing;
  }

  function scheduleRefresh() {
    if (state.refreshTimer) clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(function () { state.refreshTimer = null; refresh(); }, 60);
  }

  // --- the event stream (fetch, so that it carries the token) --------------------------------

  function follow(runId, attempt) {
    attempt = attempt || 0;
    if (state.stream) state.stream.abort();
    var ctrl = new AbortController();
    state.stream = ctrl;
    var extra = {};
    if (state.lastEventId >= 0) extra['Last-Event-ID'] = String(state.lastEventId);
    var buffer = '';
    var decoder = new TextDecoder();
    fetch('/v1/runs/' + enc(runId) + '/events', { headers: headers(extra), signal: ctrl.signal })
      .then(function (response) {
        if (!response.ok) throw new Error('events: HTTP ' + response.status);
        var reader = response.body.getReader();
        function pump() {
          return reader.read().then(function (chunk) {
            if (chunk.done) return;
            buffer += decoder.decode(chunk.value, { stream: true });
            var cut;
            while ((cut = buffer.indexOf('\n\n')) >= 0) {
              var block = buffer.slice(0, cut);
              buffer = buffer.slice(cut + 2);
              if (runId === state.runId) onBlock(block);
            }
            return pump();
          });
        }
        return pump();
      })
      .then(function () {
        if (runId !== state.runId || ctrl.signal.aborted) return;
        var ended = state.lastFinal && FINAL_EVENTS[state.lastFinal];
        if (!ended && attempt < 20) {  // the stream ended early (a restart): go on where it stopped
          setTimeout(function () { if (runId === state.runId) follow(runId, attempt + 1); }, 1000);
        }
      })
      .catch(function (e) {
        if (ctrl.signal.aborted || runId !== state.runId) return;
        notice('events: ' + e.message, 'error');
        if (attempt < 20) setTimeout(function () { follow(runId, attempt + 1); }, 1500);
      });
  }

  function onBlock(block) {
    var name = 'message', data = '', id = null;
    block.split('\n').forEach(function (line) {
      if (!line || line.charAt(0) === ':') return;
      var colon = line.indexOf(':');
      var field = colon < 0 ? line : line.slice(0, colon);
      var value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') name = value;
      else if (field === 'data') data += (data ? '\n' : '') + value;
      else if (field === 'id') id = parseInt(value, 10);
    });
    if (!data) return;
    var payload = JSON.parse(data);
    if (id != null && !isNaN(id)) state.lastEventId = id;
    state.events.push({ name: name, stage: payload.stage == null ? null : payload.stage, id: id });
    if (name === 'stage' && payload.result) {
      state.live[payload.result.stage] = { result: payload.result, elapsed_s: payload.elapsed_s, arrived: true };
      renderStages();
    }
    if (FINAL_EVENTS[name]) {
      state.lastFinal = name;
      if (name === 'error') notice('run ' + state.runId + ': ' + payload.error.message, 'error');
      if (name === 'report') loadRuns();
    } else {
      state.lastFinal = null;
    }
    scheduleRefresh();
  }

  // --- drawing the run -----------------------------------------------------------------------

  function render() {
    var doc = state.doc;
    if (!doc) return;
    $('run-title').textContent = doc.run_id;
    renderHead();
    renderImageTabs();
    showImage(state.imageIndex);
    renderLegend();
    renderStages();
    renderReview();
    renderReport();
    renderDiff();
    if (state.traceStage != null) renderTrace(state.traceStage);
  }

  function renderHead() {
    var doc = state.doc;
    var head = clear($('run-head'));
    head.appendChild(h('span', { cls: 'rid', text: doc.run_id }));
    head.appendChild(h('span', { cls: 'status ' + doc.status, id: 'run-status', text: doc.status.replace('_', ' ') }));
    if (doc.study_id) head.appendChild(h('span', { cls: 'meta', text: 'study ' + doc.study_id }));
    if (doc.model_id) head.appendChild(h('span', { cls: 'meta', text: 'model ' + doc.model_id }));
    if (doc.indication) head.appendChild(h('span', { cls: 'meta', text: 'indication: ' + doc.indication }));
    if (doc.forked_from) {
      var origin = doc.forked_from.run_id;
      head.appendChild(h('span', { cls: 'meta' }, 'fork of ',
        state.mode === 'live' ? h('a', { href: '#run=' + enc(origin), onclick: function (e) { e.preventDefault(); openRun(origin); }, text: origin }) : origin,
        ' after stage ' + doc.forked_from.stage));
    }
    if (doc.error) head.appendChild(h('span', { cls: 'meta error', text: doc.error.type + ': ' + doc.error.message }));
  }

  function renderImageTabs() {
    var tabs = clear($('image-tabs'));
    var images = state.doc.images;
    if (images.length < 2) return;
    images.forEach(function (image) {
      tabs.appendChild(h('button', {
        type: 'button', cls: image.index === state.imageIndex ? 'current' : '',
        'data-image': String(image.index), text: image.name,
        onclick: function () { state.imageIndex = image.index; renderImageTabs(); showImage(image.index); }
      }));
    });
  }

  function imageKey(index) { return state.doc.run_id + '/' + index; }

  function loadPixels(image) {
    var url = image.url;
    var getUrl;
    if (url.slice(0, 5) === 'data:') {
      getUrl = Promise.resolve(url);
    } else {
      getUrl = fetch(url, { headers: headers() }).then(function (response) {
        if (!response.ok) throw new Error('image ' + image.index + ': HTTP ' + response.status);
        return response.blob();
      }).then(function (blob) { return URL.createObjectURL(blob); });
    }
    return getUrl.then(function (src) {
      return new Promise(function (resolve, reject) {
        var img = new Image();
        img.onload = function () { resolve(img); };
        img.onerror = function () { reject(new Error('image ' + image.index + ' did not decode')); };
        img.src = src;
      });
    }).then(function (img) {
      var canvas = document.createElement('canvas');
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      var ctx = canvas.getContext('2d');
      ctx.drawImage(img, 0, 0);
      var rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      var gray = new Uint8ClampedArray(canvas.width * canvas.height);
      for (var i = 0, j = 0; j < gray.length; i += 4, j++) gray[j] = rgba[i];
      return { gray: gray, width: canvas.width, height: canvas.height };
    });
  }

  function showImage(index) {
    var doc = state.doc;
    var image = doc.images[index];
    var none = $('no-image');
    var frame = $('frame');
    if (!image || !image.url) {
      frame.hidden = true;
      none.hidden = false;
      none.textContent = image ? 'Image ' + (index + 1) + ' is not available here (SHA-256 ' +
        (image.sha256 || '?').slice(0, 16) + '...); its boxes are listed below.'
        : 'The study\'s images are not known yet.';
      renderBoxes();
      return;
    }
    var key = imageKey(index);
    var have = state.images[key];
    if (have && have.gray) {
      frame.hidden = false;
      none.hidden = true;
      paint(have);
      renderBoxes();
      return;
    }
    if (have && have.pending) return;
    state.images[key] = { pending: true };
    loadPixels(image).then(function (pixels) {
      state.images[key] = pixels;
      if (state.doc && imageKey(state.imageIndex) === key) showImage(index);
    }).catch(function (e) {
      delete state.images[key];
      notice(e.message, 'error');
    });
  }

  function paint(pixels) {
    var canvas = $('image');
    if (canvas.width !== pixels.width || canvas.height !== pixels.height) {
      canvas.width = pixels.width;
      canvas.height = pixels.height;
    }
    var ctx = canvas.getContext('2d');
    var out = ctx.createImageData(pixels.width, pixels.height);
    var lut = new Uint8ClampedArray(256);
    var w = Math.max(1, state.wl.window), low = state.wl.level - w / 2;
    for (var v = 0; v < 256; v++) lut[v] = Math.round((v - low) / w * 255);
    var data = out.data, gray = pixels.gray;
    for (var i = 0, j = 0; j < gray.length; i += 4, j++) {
      var g = lut[gray[j]];
      data[i] = g; data[i + 1] = g; data[i + 2] = g; data[i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    fitCanvas();
    canvas.setAttribute('data-loaded', state.doc.images[state.imageIndex].sha256 || 'yes');
  }

  function fitCanvas() {  // as large as the pane allows, keeping the image's proportions
    var canvas = $('image');
    var wrap = $('frame-wrap');
    if (!canvas.width || !wrap.clientWidth) return;
    var scale = Math.min(wrap.clientWidth / canvas.width, window.innerHeight * 0.7 / canvas.height);
    canvas.style.width = Math.floor(canvas.width * scale) + 'px';
    canvas.style.height = Math.floor(canvas.height * scale) + 'px';
  }

  function boxesOf(index) {
    return (state.doc ? state.doc.boxes : []).filter(function (b) { return b.image === index; });
  }

  function renderBoxes() {
    var layer = clear($('boxes'));
    boxesOf(state.imageIndex).forEach(function (b) {
      if (state.hidden[b.finding.toLowerCase()]) return;
      var el = h('div', {
        cls: 'box' + (b.box[1] < 6 ? ' below' : ''), 'data-finding': b.finding,
        'data-question': b.question_id, 'data-stage': String(b.stage), title: b.label
      }, h('span', { cls: 'box-label', text: b.label }));
      el.style.left = b.box[0] + '%';
      el.style.top = b.box[1] + '%';
      el.style.width = (b.box[2] - b.box[0]) + '%';
      el.style.height = (b.box[3] - b.box[1]) + '%';
      el.style.borderColor = b.colour;
      el.firstChild.style.background = b.colour;
      if (state.highlighted === b.question_id) el.classList.add('hl');
      layer.appendChild(el);
    });
    layer.classList.toggle('highlighting', !!layer.querySelector('.box.hl'));
  }

  function renderLegend() {
    var legend = clear($('legend'));
    var seen = {};
    var rows = [];
    state.doc.boxes.forEach(function (b) {
      var key = b.finding.toLowerCase();
      if (!seen[key]) { seen[key] = { finding: b.finding, colour: b.colour, stages: [], images: [] }; rows.push(seen[key]); }
      if (seen[key].stages.indexOf(b.stage) < 0) seen[key].stages.push(b.stage);
      if (seen[key].images.indexOf(b.image) < 0) seen[key].images.push(b.image);
    });
    if (!rows.length) {
      legend.appendChild(h('span', { cls: 'none', text: 'no boxes in this reading' + (isActive(state.doc.status) ? ' yet' : '') }));
      return;
    }
    rows.forEach(function (row) {
      var key = row.finding.toLowerCase();
      var box = h('input', { type: 'checkbox', 'data-finding': row.finding });
      box.checked = !state.hidden[key];
      box.addEventListener('change', function () {
        if (box.checked) delete state.hidden[key]; else state.hidden[key] = true;
        renderBoxes();
      });
      var swatch = h('span', { cls: 'sw' });
      swatch.style.background = row.colour;
      var where = row.images.length === 1 && state.doc.images.length > 1 ? ', image ' + (row.images[0] + 1) : '';
      legend.appendChild(h('label', { cls: 'chip' }, box, swatch,
        row.finding + ' (stage' + (row.stages.length > 1 ? 's ' : ' ') + row.stages.join(', ') + where + ')'));
    });
  }

  function highlight(questionId) {
    var layer = $('boxes');
    state.highlighted = questionId || null;
    var mine = state.doc.boxes.filter(function (b) { return b.question_id === questionId; });
    if (questionId && mine.length && !mine.some(function (b) { return b.image === state.imageIndex; })) {
      state.imageIndex = mine[0].image;  // its box is on another image: show that one
      renderImageTabs();
      showImage(state.imageIndex);
    }
    layer.classList.toggle('highlighting', !!questionId && mine.length > 0);
    Array.prototype.forEach.call(layer.querySelectorAll('.box'), function (el) {
      el.classList.toggle('hl', !!questionId && el.getAttribute('data-question') === questionId);
    });
  }

  function mergedStages() {
    var out = {};
    Object.keys(state.live).forEach(function (n) { out[n] = state.live[n]; });
    ((state.doc && state.doc.stages) || []).forEach(function (s) {
      out[s.stage] = { result: s, elapsed_s: s.elapsed_s, reviewed: s.reviewed, sources: s.sources,
        arrived: state.live[s.stage] ? state.live[s.stage].arrived : false };
    });
    return out;
  }

  function renderStages() {
    var list = clear($('stages'));
    var stages = mergedStages();
    var doc = state.doc;
    var ended = doc && !isActive(doc.status);
    var canEdit = state.mode === 'live' && doc && ended;
    var boxed = {};
    ((doc && doc.boxes) || []).forEach(function (b) { boxed[b.question_id] = true; });
    for (var n = 1; n <= STAGE_COUNT; n++) {
      var item = stages[n];
      if (!item) {
        var waiting = doc && isActive(doc.status) ? 'waiting' : (doc && doc.status === 'awaiting_review' ? 'after the review' : 'not run');
        list.appendChild(h('li', { cls: 'stage pending', 'data-stage': String(n) },
          h('div', { cls: 'stage-head' }, h('span', { cls: 'num', text: String(n) }),
            h('span', { cls: 'title', text: TITLES[n - 1] }), h('span', { cls: 'time', text: waiting }))));
        continue;
      }
      list.appendChild(stageCard(n, item, canEdit, boxed));
    }
    reopenEditor();
  }

  function stageCard(n, item, canEdit, boxed) {
    var result = item.result;
    var card = h('li', { cls: 'stage ' + (result.skipped ? 'skipped' : 'done') + (item.arrived ? ' arrived' : ''),
      'data-stage': String(n) });
    item.arrived = false;
    var traceButton = state.mode === 'live' || (state.doc && state.doc.trace.length)
      ? h('button', { type: 'button', cls: 'small plain trace-btn', text: 'trace', onclick: function () { toggleTrace(n); } }) : null;
    card.appendChild(h('div', { cls: 'stage-head' }, h('span', { cls: 'num', text: String(n) }),
      h('span', { cls: 'title', text: TITLES[n - 1] }),
      h('span', { cls: 'time', text: result.skipped ? 'skipped' : seconds(item.elapsed_s) }),
      result.skipped ? null : traceButton));
    if (result.skipped) {
      card.appendChild(h('div', { cls: 'skip', text: result.skipped }));
      return card;
    }
    var texts = {};
    result.questions.forEach(function (q) { texts[q.id] = q.text; });
    var reviewed = item.reviewed || [];
    var sources = item.sources || {};
    var qa = h('ul', { cls: 'qa' });
    result.answers.forEach(function (answer) {
      var qid = answer.question_id;
      var row = h('li', { cls: 'qa-item' + (boxed[qid] ? ' has-box' : ''), 'data-question': qid,
        onmouseenter: function () { highlight(qid); }, onmouseleave: function () { highlight(null); } },
      canEdit ? h('button', { type: 'button', cls: 'small plain edit-btn', text: 'correct',
        onclick: function () { openEditor(row, n, qid, answer.text); } }) : null,
      h('div', { cls: 'q', text: texts[qid] || qid }),
      h('div', { cls: 'a' }, answer.text, reviewed.indexOf(qid) >= 0 ? h('span', { cls: 'tag', text: 'corrected' }) : null),
      sources[qid] ? h('div', { cls: 'made', text: sources[qid] }) : null);
      qa.appendChild(row);
    });
    card.appendChild(qa);
    return card;
  }

  function openEditor(row, stage, qid, text, keepFocus) {
    if (row.querySelector('.editor')) return;
    var area = h('textarea', { 'data-question': qid });
    area.value = text;
    state.editor = { stage: stage, qid: qid, value: text, runId: state.runId };
    area.addEventListener('input', function () { if (state.editor) state.editor.value = area.value; });
    var editor = h('div', { cls: 'editor' }, area, h('div', {},
      h('button', { type: 'button', cls: 'small fork-btn', text: 'fork after stage ' + stage + ' with this answer',
        onclick: function () { fork(stage, qid, area.value, editor); } }),
      h('button', { type: 'button', cls: 'small plain', text: 'cancel', onclick: function () {
        state.editor = null;
        row.removeChild(editor);
      } })));
    row.appendChild(editor);
    if (!keepFocus) area.focus();
  }

  function reopenEditor() {  // a re-drawn stage list keeps the correction being typed
    var e = state.editor;
    if (!e || e.runId !== state.runId) return;
    var row = document.querySelector('#stages .stage[data-stage="' + e.stage + '"] .qa-item[data-question="' + e.qid + '"]');
    if (row && row.querySelector('.edit-btn')) openEditor(row, e.stage, e.qid, e.value, true);
  }

  function fork(stage, qid, text, editor) {
    var edits = {};
    edits[qid] = text;
    Array.prototype.forEach.call(editor.querySelectorAll('button'), function (b) { b.disabled = true; });
    var source = state.runId;
    api('/v1/runs/' + enc(source) + '/forks', { method: 'POST', json: { stage: stage, edits: edits } })
      .then(function (body) {
        notice('forked ' + source + ' after stage ' + stage + ' as ' + body.run_id, 'info');
        loadRuns();
        return openRun(body.run_id);
      })
      .catch(function (e) {
        notice('fork: ' + e.message, 'error');
        Array.prototype.forEach.call(editor.querySelectorAll('button'), function (b) { b.disabled = false; });
      });
  }

  function renderReview() {
    var panel = $('review');
    var doc = state.doc;
    if (doc.status !== 'awaiting_review' || !doc.review) {
      panel.hidden = true;
      clear(panel);
      return;
    }
    var review = doc.review;
    if (panel.getAttribute('data-stage') === String(review.stage) && !panel.hidden) return;  // keep typed text
    clear(panel);
    panel.hidden = false;
    panel.setAttribute('data-stage', String(review.stage));
    panel.appendChild(h('h3', { text: 'Review of stage ' + review.stage + ': approve the answers, or correct them' }));
    var texts = {};
    (review.questions || []).forEach(function (q) { texts[q.id] = q.text; });
    var areas = [];
    (review.answers || []).forEach(function (answer) {
      var area = h('textarea', { 'data-question': answer.question_id });
      area.value = answer.text;
      area.setAttribute('data-original', answer.text);
      areas.push(area);
      panel.appendChild(h('div', { cls: 'item' }, h('div', { cls: 'q', text: texts[answer.question_id] || answer.question_id }), area));
    });
    if (state.mode !== 'live') {
      panel.appendChild(h('p', { text: 'The run waits for this review.' }));
      return;
    }
    var approve = h('button', { type: 'button', id: 'approve', text: 'Approve stage ' + review.stage });
    var send = h('button', { type: 'button', id: 'send-corrections', cls: 'plain', text: 'Send corrections' });
    function decide(withEdits) {
      var edits = {};
      if (withEdits) {
        areas.forEach(function (a) {
          if (a.value.trim() && a.value !== a.getAttribute('data-original')) edits[a.getAttribute('data-question')] = a.value.trim();
        });
      }
      approve.disabled = send.disabled = true;
      var runId = state.runId;
      api('/v1/runs/' + enc(runId) + '/review', { method: 'POST', json: { edits: edits } }).then(function () {
        notice(Object.keys(edits).length ? 'corrections sent; the run goes on' : 'stage ' + review.stage + ' approved; the run goes on', 'info');
        panel.hidden = true;
        panel.removeAttribute('data-stage');
        state.lastFinal = null;
        follow(runId);
        scheduleRefresh();
      }).catch(function (e) {
        notice('review: ' + e.message, 'error');
        approve.disabled = send.disabled = false;
      });
    }
    approve.addEventListener('click', function () { decide(false); });
    send.addEventListener('click', function () { decide(true); });
    panel.appendChild(h('div', { cls: 'actions' }, approve, send));
  }

  function renderReport() {
    var panel = clear($('report'));
    var report = state.doc.report;
    if (!report) return;
    panel.appendChild(h('h3', { text: 'Report' }));
    if (report.findings) panel.appendChild(h('div', {}, h('b', { text: 'Findings' }), h('p', { text: report.findings })));
    if (report.impression) panel.appendChild(h('div', {}, h('b', { text: 'Impression' }), h('p', { text: report.impression })));
    (report.limitations || []).forEach(function (text) {
      panel.appendChild(h('p', { cls: 'limitation', text: 'Limitation: ' + text }));
    });
  }

  // --- fork diffs ----------------------------------------------------------------------------

  function loadDiff() {
    var runId = state.runId;
    return api('/v1/runs/' + enc(runId) + '/diff').then(function (diff) {
      if (runId !== state.runId) return;
      state.diff = diff;
      renderDiff();
    }).catch(function (e) { notice('diff: ' + e.message, 'error'); });
  }

  function renderDiff() {
    var panel = $('diff');
    var diff = state.diff;
    if (!diff) { panel.hidden = true; return; }
    clear(panel);
    panel.hidden = false;
    var first = diff.first_divergent_stage;
    panel.appendChild(h('h2', { text: 'What the correction changed: ' + diff.before + ' (left) and the fork ' + diff.after + ' (right)' }));
    panel.appendChild(h('p', { cls: 'meta', text: first == null ? 'No answer differs.' :
      'First stage that differs: ' + first + '. Stages after ' + diff.stage + ' were read again.' }));
    var table = h('table', { cls: 'diff' },
      h('colgroup', {}, h('col', { cls: 'c-stage' }), h('col', { cls: 'c-question' }), h('col', {}), h('col', {})),
      h('thead', {}, h('tr', {}, h('th', { text: 'stage' }), h('th', { text: 'question' }),
        h('th', { text: diff.before }), h('th', { text: diff.after }))));
    var body = h('tbody');
    diff.stages.forEach(function (s) {
      if (diff.stage != null && s.stage < diff.stage) return;
      if (!s.changes.length) {
        if (diff.stage != null && s.stage > diff.stage) {
          body.appendChild(h('tr', { cls: 'unchanged', 'data-stage': String(s.stage) }, h('td', { text: String(s.stage) }),
            h('td', { colspan: '3', text: 'unchanged' })));
        }
        return;
      }
      s.changes.forEach(function (c) {
        var asked = c.after_question || c.before_question || c.question || c.question_id;
        var reworded = c.before_question && c.after_question && c.before_question !== c.after_question;
        function side(cls, answer, question) {
          return h('td', { cls: cls }, reworded ? h('div', { cls: 'asked', text: 'asked: ' + question }) : null,
            answer == null ? '(not asked)' : answer);
        }
        body.appendChild(h('tr', { cls: 'changed' + (s.stage === diff.stage ? ' edit' : ''), 'data-stage': String(s.stage), 'data-question': c.question_id },
          h('td', { text: String(s.stage) }), h('td', { text: asked }),
          side('before', c.before, c.before_question), side('after', c.after, c.after_question)));
      });
    });
    table.appendChild(body);
    panel.appendChild(table);
  }

  // --- traces --------------------------------------------------------------------------------

  function toggleTrace(stage) {
    if (state.traceStage === stage && !$('trace').hidden) {
      state.traceStage = null;
      $('trace').hidden = true;
      return;
    }
    state.traceStage = stage;
    renderTrace(stage);
    $('trace').scrollIntoView({ block: 'nearest' });
  }

  function kv(label, value) {
    return value == null || value === '' ? null : h('span', {}, label + ' ', h('b', { text: String(value) }));
  }

  function renderTrace(stage) {
    var panel = clear($('trace'));
    panel.hidden = false;
    panel.setAttribute('data-stage', String(stage));
    var records = (state.doc.trace || []).filter(function (r) { return r.stage === stage; });
    panel.appendChild(h('h2', {}, 'Trace of stage ' + stage + ' ', h('button', { type: 'button', cls: 'small plain', text: 'close',
      onclick: function () { state.traceStage = null; panel.hidden = true; } })));
    var stageRecord = records.filter(function (r) { return r.kind === 'stage'; })[0];
    if (stageRecord) {
      panel.appendChild(h('div', { cls: 'kv' }, kv('status', stageRecord.status), kv('latency', seconds(stageRecord.latency_s)),
        kv('retries', stageRecord.retries), kv('checkpoint', stageRecord.checkpoint_id),
        stageRecord.errors && stageRecord.errors.length ? kv('errors', stageRecord.errors.join('; ')) : null));
    }
    var questions = records.filter(function (r) { return r.kind === 'question'; });
    if (!questions.length) panel.appendChild(h('p', { text: 'No question records of this stage (yet).' }));
    questions.forEach(function (r) {
      var context = h('ul', {});
      (r.context || []).forEach(function (c) {
        context.appendChild(h('li', { text: c.id + (c.score == null ? '' : '  (score ' + Number(c.score).toFixed(3) + ')') }));
      });
      panel.appendChild(h('div', { cls: 'trace-q', 'data-question': r.question_id },
        h('h3', { text: r.question_id + ': ' + r.question }),
        h('div', { cls: 'kv' }, kv('type', r.qtype), kv('model', r.model_id), kv('dialect', r.dialect),
          kv('latency', seconds(r.latency_s)), kv('retries', r.retries), kv('finish', r.finish_reason),
          kv('tokens', r.prompt_tokens + ' in, ' + r.completion_tokens + ' out'), kv('parse', r.parse_status),
          kv('context used', r.context_used)),
        h('div', {}, h('b', { text: 'prompt' }), r.prompt_sha256 ? ' sha256 ' + r.prompt_sha256.slice(0, 12) : ''),
        h('pre', { cls: 'prompt', text: r.prompt == null ? '(the backend renders no prompt)' : r.prompt }),
        h('div', {}, h('b', { text: 'context' }), ' ' + (r.context || []).length + ' item(s)'), context,
        h('div', {}, h('b', { text: 'raw output' })), h('pre', { cls: 'raw', text: r.raw_output }),
        h('div', {}, h('b', { text: 'parsed' })), h('pre', { cls: 'parsed', text: JSON.stringify(r.parsed, null, 1) })));
    });
  }

  // --- a new reading -------------------------------------------------------------------------

  function addFiles(field, files) {
    for (var i = 0; i < files.length; i++) state.files[field].push(files[i]);
    renderFiles(field);
  }

  function renderFiles(field) {
    var list = clear(document.querySelector('#drop-' + field + ' ul.files'));
    state.files[field].forEach(function (file, i) {
      list.appendChild(h('li', {}, h('span', { text: file.name + ' (' + Math.ceil(file.size / 1024) + ' KB)' }),
        h('button', { type: 'button', cls: 'small plain', text: 'remove', onclick: function () {
          state.files[field].splice(i, 1);
          renderFiles(field);
        } })));
    });
  }

  function wireDrop(zone) {
    var field = zone.getAttribute('data-field');
    zone.addEventListener('dragover', function (e) { e.preventDefault(); zone.classList.add('over'); });
    zone.addEventListener('dragleave', function () { zone.classList.remove('over'); });
    zone.addEventListener('drop', function (e) {
      e.preventDefault();
      zone.classList.remove('over');
      if (e.dataTransfer && e.dataTransfer.files) addFiles(field, e.dataTransfer.files);
    });
    zone.querySelector('input[type=file]').addEventListener('change', function (e) {
      addFiles(field, e.target.files);
      e.target.value = '';
    });
  }

  function startReading(e) {
    e.preventDefault();
    if (!state.files.images.length) {
      notice('Drop at least one image of the current study first.', 'error');
      return;
    }
    var form = new FormData();
    state.files.images.forEach(function (f) { form.append('images', f, f.name); });
    state.files.prior.forEach(function (f) { form.append('prior', f, f.name); });
    var indication = $('indication').value.trim();
    var pauses = $('review-after').value.trim();
    if (indication) form.append('indication', indication);
    if (pauses) form.append('review_after', pauses);
    $('start').disabled = true;
    notice('uploading...', 'info');
    api('/v1/runs', { method: 'POST', body: form }).then(function (body) {
      notice('reading ' + body.run_id, 'info');
      state.files = { images: [], prior: [] };
      renderFiles('images');
      renderFiles('prior');
      loadRuns();
      return openRun(body.run_id);
    }).catch(function (err) {
      notice('the reading was not started: ' + err.message, 'error');
    }).then(function () { $('start').disabled = false; });
  }

  // --- start ---------------------------------------------------------------------------------

  function wireWindowLevel() {
    var win = $('wl-window'), level = $('wl-level');
    function update() {
      state.wl = { window: parseFloat(win.value), level: parseFloat(level.value) };
      var pixels = state.doc && state.images[imageKey(state.imageIndex)];
      if (pixels && pixels.gray) paint(pixels);
    }
    win.addEventListener('input', update);
    level.addEventListener('input', update);
    $('wl-reset').addEventListener('click', function () { win.value = '255'; level.value = '127.5'; update(); });
  }

  function init() {
    wireWindowLevel();
    window.addEventListener('resize', fitCanvas);
    var embedded = $('cxrtrek-run');
    if (embedded) {  // a file written by cxrtrek view: draw it, fetch nothing
      state.mode = 'static';
      document.body.classList.add('static');
      state.doc = JSON.parse(embedded.textContent);
      state.runId = state.doc.run_id;
      $('empty').hidden = true;
      $('run').hidden = false;
      render();
      return;
    }
    var params = new URLSearchParams(location.hash.slice(1));
    state.token = params.get('token') || sessionStorage.getItem('cxrtrek-token') || '';
    if (params.get('token')) sessionStorage.setItem('cxrtrek-token', state.token);
    var tokenInput = $('token');
    tokenInput.value = state.token;
    tokenInput.addEventListener('change', function () {
      state.token = tokenInput.value.trim();
      sessionStorage.setItem('cxrtrek-token', state.token);
      notice('', '');
      loadRuns();
      if (state.runId) openRun(state.runId);
    });
    wireDrop($('drop-images'));
    wireDrop($('drop-prior'));
    $('upload-form').addEventListener('submit', startReading);
    $('refresh-runs').addEventListener('click', loadRuns);
    $('open-form').addEventListener('submit', function (e) {
      e.preventDefault();
      var id = $('open-id').value.trim();
      if (id) openRun(id);
    });
    var run = params.get('run');
    history.replaceState(null, '', run ? '#run=' + enc(run) : location.pathname);
    loadRuns();
    if (run) openRun(run);
    window.addEventListener('hashchange', function () {  // a link to #run=ID (or #token=...)
      var changed = new URLSearchParams(location.hash.slice(1));
      if (changed.get('token')) {
        state.token = tokenInput.value = changed.get('token');
        sessionStorage.setItem('cxrtrek-token', state.token);
      }
      var wanted = changed.get('run');
      history.replaceState(null, '', wanted ? '#run=' + enc(wanted) : location.pathname);
      if (wanted && wanted !== state.runId) openRun(wanted);
    });
  }

  window.cxrtrekViewer = { state: state, openRun: openRun, refresh: refresh, highlight: highlight };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();

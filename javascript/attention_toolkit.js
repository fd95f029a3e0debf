// Attention Toolkit: hover help and section show/hide for the controls built by lib_attn/ui.py.
//
// ui.py puts, in each tab (txt2img, img2img), a hidden element with a data-attn-toolkit attribute holding JSON:
//   {"help": {elem_id: help text}, "sections": [{"name", "enabled": elem_id, "body": elem_id}], "sync": elem_id}
// The help texts themselves live only in lib_attn/settings.py.  This file defines one global,
// window.attentionToolkit, and registers itself with the WebUI's onUiLoaded / onAfterUiUpdate when they exist.
// Nothing here throws when an element is missing.

(function () {
    "use strict";

    var DATA_ATTR = "data-attn-toolkit";

    function app() {
        try {
            if (typeof gradioApp === "function") {
                var root = gradioApp();
                if (root && typeof root.querySelectorAll === "function") {
                    return root;
                }
            }
        } catch (e) {
            // fall through to document
        }
        return document;
    }

    function byId(root, id) {
        if (!id) {
            return null;
        }
        try {
            return root.querySelector('[id="' + String(id).replace(/["\\]/g, "\\$&") + '"]');
        } catch (e) {
            return null;
        }
    }

    // Every tab's JSON block, parsed; a malformed block is skipped.
    function readData(root) {
        var out = [];
        var nodes = (root || app()).querySelectorAll("[" + DATA_ATTR + "]");
        for (var i = 0; i < nodes.length; i++) {
            try {
                var data = JSON.parse(nodes[i].getAttribute(DATA_ATTR) || "{}");
                if (data && typeof data === "object") {
                    out.push(data);
                }
            } catch (e) {
                console.warn("Attention Toolkit: unreadable UI data", e);
            }
        }
        return out;
    }

    // Sets `title` (hover help) on every control found; returns how many were set.
    function applyHelp() {
        var root = app();
        var count = 0;
        readData(root).forEach(function (data) {
            var help = data.help || {};
            Object.keys(help).forEach(function (id) {
                var el = byId(root, id);
                if (el && help[id] && el.title !== help[id]) {
                    el.title = help[id];
                    count++;
                }
            });
        });
        return count;
    }

    function isHidden(el) {
        if (!el) {
            return true; // gradio may leave an invisible block out of the DOM
        }
        if (el.classList.contains("hide") || el.classList.contains("hidden")) {
            return true;
        }
        try {
            return window.getComputedStyle(el).display === "none";
        } catch (e) {
            return false;
        }
    }

    // Sections whose body visibility disagrees with their enable checkbox.
    function mismatches(root, data) {
        var bad = [];
        (data.sections || []).forEach(function (s) {
            var box = byId(root, s.enabled);
            var input = box ? box.querySelector('input[type="checkbox"]') : null;
            if (!input) {
                return;
            }
            if (input.checked === isHidden(byId(root, s.body))) {
                bad.push(s.name);
            }
        });
        return bad;
    }

    // Re-derives each section body's visibility from its checkbox by clicking the tab's hidden sync button,
    // whose gradio event sends the checkbox values to the server and returns the visibility updates; gradio
    // stays the single owner of the visibility state.  Returns the names of the sections that were out of step.
    function syncSections() {
        var root = app();
        var fixed = [];
        readData(root).forEach(function (data) {
            var bad = mismatches(root, data);
            var button = byId(root, data.sync);
            if (bad.length && button) {
                var target = button.tagName === "BUTTON" ? button : button.querySelector("button") || button;
                target.click();
                fixed = fixed.concat(bad);
            }
        });
        return fixed;
    }

    function safely(fn) {
        return function () {
            try {
                return fn.apply(null, arguments);
            } catch (e) {
                console.warn("Attention Toolkit:", e);
                return undefined;
            }
        };
    }

    var api = {
        readData: safely(function () {
            return readData(app());
        }),
        applyHelp: safely(applyHelp),
        syncSections: safely(syncSections),
        init: safely(function () {
            applyHelp();
            syncSections();
        }),
    };
    window.attentionToolkit = api;

    if (typeof onUiLoaded === "function") {
        onUiLoaded(api.init);
    }
    // Blocks that gradio renders late (a hidden section body, a closed accordion) get their titles later.
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(api.applyHelp);
    }
})();

//! A model directory's `tokenizer.json`, loaded as `mamba generate` loads it; when it loads, a
//! prompt encoded and decoded back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_fuzz::{check, scratch, write};

fuzz_target!(|bytes: &[u8]| {
    // libfuzzer-sys's panic hook aborts before any unwinding, but load_tokenizer catches the
    // panics of the tokenizers library (see there): the default hook lets them unwind to it. A
    // panic that escapes still aborts, as libfuzzer-sys aborts on any that reaches it.
    static DEFAULT_HOOK: std::sync::Once = std::sync::Once::new();
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
    let path = write(scratch(), "tokenizer.json", bytes);
    let Some(tokenizer) = check(mamba_text::load_tokenizer(scratch()), &path) else { return };
    if let Ok(encoding) = tokenizer.encode("To be, or not to be: ü ∑ 🐍", false) {
        let _ = tokenizer.decode(encoding.get_ids(), true);
    }
});

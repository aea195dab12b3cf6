//! `carrot.json` of arbitrary bytes: parsed and validated; a manifest that parses must serialise.
#![no_main]

use carrot_contract::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Manifest::parse(text, "carrot.json") {
        let _ = m.has_vision();
        let again = m.to_json();
        Manifest::parse(&again, "carrot.json").expect("a valid manifest round-trips");
    }
});

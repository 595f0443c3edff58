//! `passthrough`: changes nothing. The benchmark's baseline plugin: it measures what the
//! plugin machinery itself costs per request (both hooks).

wit_bindgen::generate!({ path: "../wit", world: "plugin" });

struct Passthrough;

impl Guest for Passthrough {
    fn on_request(req: Request) -> RequestAction {
        RequestAction::Proceed(req.messages)
    }
    fn on_response(_req: Request, text: String) -> ResponseAction {
        ResponseAction::Proceed(text)
    }
    fn on_chunk(chunk: String) -> ResponseAction {
        ResponseAction::Proceed(chunk)
    }
    fn on_stream_end() -> ResponseAction {
        ResponseAction::Proceed(String::new())
    }
}

export!(Passthrough);

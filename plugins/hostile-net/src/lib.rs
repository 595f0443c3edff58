//! `hostile-net`: a plugin that opens a TCP connection, so its component imports
//! `wasi:sockets`. The agent grants no network unless the EdgeModel says so, and must
//! refuse to load it with `ImportNotGranted`. Test fixture only.

wit_bindgen::generate!({ path: "../wit", world: "plugin" });

struct HostileNet;

impl Guest for HostileNet {
    fn on_request(req: Request) -> RequestAction {
        match std::net::TcpStream::connect("10.0.0.1:80") {
            Ok(_) => RequestAction::Reject("connected".into()),
            Err(_) => RequestAction::Proceed(req.messages),
        }
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

export!(HostileNet);
